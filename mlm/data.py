"""IMDb reviews → token ids with word ids → fixed-size chunks, cached on disk.

This is everything between raw text and the (N, chunk_size) arrays that training and evaluation consume,
reproducing the Hugging Face course pipeline without `datasets`:

1. `load_texts`: the text column of one split, from a Hub dataset repo, a local folder with the Hub layout
   (`plain_text/{split}-*.parquet`), or a single parquet / JSON-lines / text file.
2. `tokenize`: every review becomes [CLS] … [SEP] with each token's word id (-1 at special tokens), exactly
   what the course's `tokenizer(examples["text"])` plus `word_ids(i)` gives.
3. `chunk`: all reviews joined end to end and cut into `chunk_size` blocks, the last partial block dropped
   (the course's `group_texts`). With `group_size` the joining happens per group of reviews, as
   `datasets.map(batched=True, batch_size=group_size)` does, which reproduces the course's chunk counts.
4. `load_chunks`: steps 1-3 behind a cache keyed by the data, the tokenizer and the chunking options.
5. `split_train_test`: the course's `train_test_split(train_size=10_000, test_size=1_000, seed=42)`.

Everything works on flat numpy arrays: there is no Python loop per token, and per review only the attribute
access needed to pull ids out of the tokenizer's Encoding objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlm.errors import MLMError
from mlm.hub import resolve_repo
from mlm.tokenizer import Tokenizer

DEFAULT_DATASET = "stanfordnlp/imdb"
SPLITS = ("train", "test", "unsupervised")
DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".txt")
# Reviews per encode_batch call. The tokenizer parallelises inside a call, so a batch only has to be large
# enough to keep its thread pool busy; 2,000 IMDb reviews (~630k tokens) do. Tokenizing everything in one
# call would hold 25,000 Encoding objects at once (~1.5 GB for IMDb train) and is no faster.
ENCODE_BATCH_SIZE = 2_000
ENCODE_BATCHES_IN_FLIGHT = 2  # encode_batch calls running at once (see `tokenize`)
# Bump when the meaning or layout of a cache file changes, so old files are rebuilt rather than misread.
CACHE_FORMAT_VERSION = 1


@dataclass
class Chunks:
    """Fixed-size blocks of token ids and the word id of every token.

    input_ids: (N, chunk_size) int32 token ids.
    word_ids:  (N, chunk_size) int32; the index of the token's word within its review, -1 at [CLS]/[SEP].
    n_reviews, n_tokens: size of the corpus the chunks were cut from ([CLS]/[SEP] counted, dropped tail
        tokens too); a subset made by `select` or `split_train_test` keeps its parent's figures.
    cache_path: the cache file these chunks were read from or written to, None if not cached.
    """

    input_ids: np.ndarray
    word_ids: np.ndarray
    n_reviews: int
    n_tokens: int
    cache_path: Path | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def chunk_size(self) -> int:
        return self.input_ids.shape[1]

    def select(self, indices: np.ndarray) -> Chunks:
        """The chunks at `indices` (1-D int array), in that order, like `datasets.Dataset.select`."""
        return Chunks(self.input_ids[indices], self.word_ids[indices], self.n_reviews, self.n_tokens)


# ---------------------------------------------------------------------------------------------------------
# 1. Reading the texts


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
            f".jsonl, .txt). Splits found there: {', '.join(found) or 'none'}."
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
    same layout, or a single .parquet / .jsonl / .txt file (see `find_data_files` for what `split` means
    then). `text_column` names the column in parquet and JSON lines files; a text file has one review per
    line. Raises MLMError for a missing column, an empty split, or an unreadable or non-UTF-8 file.
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


# ---------------------------------------------------------------------------------------------------------
# 2-3. Tokenizing and chunking


def tokenize(
    texts: list[str], tokenizer: Tokenizer, *, batch_size: int = ENCODE_BATCH_SIZE, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize every text with [CLS] … [SEP] around it and lay all tokens end to end.

    Returns (input_ids, word_ids, lengths): input_ids and word_ids are (T,) int32 over all T tokens, word_ids
    -1 at special tokens; lengths is (R,) int64, the token count of each of the R texts.
    """
    backend = tokenizer.backend
    batches = [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]
    ids_parts, word_parts, length_parts = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc="tokenizing", unit="review", leave=False)
    # encode_batch, not encode_batch_fast: the fast variant skips offsets and with them the word ids (it returns
    # None for every token in tokenizers 0.23).
    try:
        for encodings in _encode_ahead(backend, batches):
            lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
            # Each .ids is a Python list; chaining them into fromiter fills one array without a list of lists.
            ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(lengths.sum()))
            # word_ids holds None at special tokens, which numpy cannot read as an integer; pyarrow turns None
            # into null while converting in C, and fill_null(-1) gives the -1 we store.
            words = pa.array([e.word_ids for e in encodings], type=pa.list_(pa.int32())).flatten()
            ids_parts.append(ids)
            word_parts.append(words.fill_null(-1).to_numpy())
            length_parts.append(lengths)
            if bar is not None:
                bar.update(len(encodings))
    finally:
        if bar is not None:
            bar.close()
    if not ids_parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(ids_parts), np.concatenate(word_parts), np.concatenate(length_parts)


def _encode_ahead(backend, batches: list[list[str]]):
    """Yield backend.encode_batch(batch) for each batch in order, tokenizing the next batches meanwhile.

    encode_batch releases the GIL and runs on the tokenizer's own thread pool, so helper threads tokenize
    ahead while the caller copies the ids of the current batch into numpy: that copy, the only per-review
    Python work left, then mostly hides behind tokenizing instead of adding ~15% to it on 2 cores. Two calls
    in flight keep the pool busy while either does its serial, GIL-bound list conversions. At most
    ENCODE_BATCHES_IN_FLIGHT + 1 batches of Encodings are alive, whatever the speed of the caller.
    """
    with ThreadPoolExecutor(max_workers=ENCODE_BATCHES_IN_FLIGHT) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.submit(backend.encode_batch, batch))
            if len(pending) == ENCODE_BATCHES_IN_FLIGHT:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def check_chunk_size(chunk_size: int, max_position_embeddings: int | None = None) -> None:
    """Raise MLMError unless 2 <= chunk_size <= max_position_embeddings (when given)."""
    if chunk_size < 2:
        raise MLMError(f"--chunk-size must be at least 2 (got {chunk_size}); the course uses 128.")
    if max_position_embeddings is not None and chunk_size > max_position_embeddings:
        raise MLMError(
            f"--chunk-size {chunk_size} is longer than the model's max_position_embeddings "
            f"({max_position_embeddings}): it has no position embedding beyond that. Use at most that."
        )


def check_group_size(group_size: int | None) -> None:
    """Raise MLMError unless group_size is None or a positive number of reviews."""
    if group_size is not None and group_size < 1:
        raise MLMError(f"--group-size must be a positive number of reviews (got {group_size}).")


def chunk(
    input_ids: np.ndarray,
    word_ids: np.ndarray,
    lengths: np.ndarray,
    *,
    chunk_size: int = 128,
    group_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the flat token stream of `tokenize` into (N, chunk_size) blocks, word ids alongside.

    group_size=None joins all reviews and drops only the final partial block. group_size=g joins each run of g
    reviews separately (the last run may be shorter) and drops each run's partial block, as the course's
    `group_texts` under `datasets.map(batched=True, batch_size=g)` does.
    Returns (input_ids, word_ids), both (N, chunk_size) int32.
    """
    check_group_size(group_size)
    if group_size is None:
        n_kept = len(input_ids) // chunk_size * chunk_size
        keep = slice(0, n_kept)
    else:
        group_tokens = np.add.reduceat(lengths, np.arange(0, len(lengths), group_size)) if len(lengths) else lengths
        kept = group_tokens // chunk_size * chunk_size
        # The stream is a run of kept tokens then a run of dropped tokens per group: repeat True kept[g]
        # times and False (group_tokens[g] - kept[g]) times, group after group.
        run_lengths = np.stack([kept, group_tokens - kept], axis=1).ravel()
        keep = np.repeat(np.tile([True, False], len(kept)), run_lengths)
    return input_ids[keep].reshape(-1, chunk_size), word_ids[keep].reshape(-1, chunk_size)


def tokenize_and_chunk(
    texts: list[str],
    tokenizer: Tokenizer,
    *,
    chunk_size: int = 128,
    group_size: int | None = None,
    max_position_embeddings: int | None = None,
    progress: bool = False,
) -> Chunks:
    """Tokenize `texts` and cut them into chunks (no cache): `tokenize` then `chunk`.

    Returns Chunks with input_ids and word_ids of shape (N, chunk_size), int32. Raises MLMError for a bad
    chunk_size or a corpus too short to fill a single chunk.
    """
    check_chunk_size(chunk_size, max_position_embeddings)
    check_group_size(group_size)
    input_ids, word_ids, lengths = tokenize(texts, tokenizer, progress=progress)
    chunk_ids, chunk_words = chunk(input_ids, word_ids, lengths, chunk_size=chunk_size, group_size=group_size)
    if len(chunk_ids) == 0:
        per_group = "" if group_size is None else f" in any group of {group_size} reviews"
        raise MLMError(
            f"The corpus has {len(input_ids)} tokens in {len(texts)} reviews, not enough to fill one chunk of "
            f"{chunk_size} tokens{per_group}. Use more text or a smaller --chunk-size"
            + ("." if group_size is None else " or --group-size.")
        )
    return Chunks(chunk_ids, chunk_words, n_reviews=len(texts), n_tokens=len(input_ids))


# ---------------------------------------------------------------------------------------------------------
# 4. The cache


def default_cache_dir() -> Path:
    """$MLM_CACHE if set, else <HF_HOME>/mlm (HF_HOME defaults to ~/.cache/huggingface), else ~/.cache/mlm."""
    if os.environ.get("MLM_CACHE"):
        return Path(os.environ["MLM_CACHE"]).expanduser()
    try:
        from huggingface_hub import constants
    except ImportError:
        return Path("~/.cache/mlm").expanduser()
    return Path(constants.HF_HOME).expanduser() / "mlm"


def cache_key(
    files: list[Path], tokenizer: Tokenizer, *, chunk_size: int, group_size: int | None, text_column: str
) -> dict:
    """Everything the chunks depend on, as a JSON-able dict; its hash names the cache file.

    Data files are identified by the SHA-256 of their content, not by path + size + mtime: hashing IMDb's
    ~130 MB takes well under 0.1 s, which is nothing next to tokenizing (seconds) and buys exactness. A copied
    or re-downloaded but identical file still hits the cache, and a file edited in place always misses it,
    even when its size and mtime survive (e.g. `cp -p`, or an edit within the file system's mtime granularity).
    The tokenizer is identified by its serialized JSON, which covers vocabulary, normalizer and template.
    """
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "data_sha256": [_file_sha256(file) for file in files],
        "tokenizer_sha256": hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest(),
        "chunk_size": chunk_size,
        "group_size": group_size,
        "text_column": text_column,
    }


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _arrays_sha256(input_ids: np.ndarray, word_ids: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(input_ids).data)
    digest.update(np.ascontiguousarray(word_ids).data)
    return digest.hexdigest()


def load_chunks(
    source: str | Path,
    split: str,
    tokenizer: Tokenizer,
    *,
    chunk_size: int = 128,
    group_size: int | None = None,
    text_column: str = "text",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    max_position_embeddings: int | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Chunks:
    """The chunks of `split` of `source` (see `load_texts`), from the cache when a valid entry exists.

    On a miss, or when the cache file is truncated or corrupt (a warning says so), the chunks are rebuilt
    with `tokenize_and_chunk` and written to `cache_dir` (default `default_cache_dir()`)/chunks. Returns
    Chunks with (N, chunk_size) int32 input_ids and word_ids and `cache_path` set; use_cache=False neither
    reads nor writes the cache.
    """
    check_chunk_size(chunk_size, max_position_embeddings)
    check_group_size(group_size)
    files = find_data_files(source, split, revision=revision)
    if not use_cache:
        texts = read_texts(files, text_column=text_column)
        return tokenize_and_chunk(texts, tokenizer, chunk_size=chunk_size, group_size=group_size, progress=progress)

    key = cache_key(files, tokenizer, chunk_size=chunk_size, group_size=group_size, text_column=text_column)
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / "chunks" / f"{split}-{chunk_size}-{key_hash[:20]}.safetensors"
    if path.exists():
        chunks = _read_cache(path, key_hash, chunk_size)
        if chunks is not None:
            return chunks

    texts = read_texts(files, text_column=text_column)
    chunks = tokenize_and_chunk(texts, tokenizer, chunk_size=chunk_size, group_size=group_size, progress=progress)
    if _write_cache(path, chunks, key, key_hash):
        chunks.cache_path = path
    return chunks


def _read_cache(path: Path, key_hash: str, chunk_size: int) -> Chunks | None:
    """The chunks stored at `path`, or None (with a warning) when the file cannot be trusted."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            input_ids = handle.get_tensor("input_ids")
            word_ids = handle.get_tensor("word_ids")
        problem = None
        if metadata.get("key_sha256") != key_hash:
            problem = "its key does not match its name"
        elif not (input_ids.dtype == word_ids.dtype == np.int32):
            problem = f"wrong dtypes {input_ids.dtype}/{word_ids.dtype}"
        elif input_ids.ndim != 2 or input_ids.shape[1] != chunk_size or input_ids.shape != word_ids.shape:
            problem = f"wrong shapes {input_ids.shape}/{word_ids.shape}"
        elif metadata.get("arrays_sha256") != _arrays_sha256(input_ids, word_ids):
            # safetensors checks the header and the file length, not the bytes: a flipped bit passes.
            problem = "checksum mismatch"
        n_reviews, n_tokens = int(metadata["n_reviews"]), int(metadata["n_tokens"])
    except Exception as err:  # any failure to read (SafetensorError, OSError, missing key) means: rebuild
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        warnings.warn(f"Ignoring corrupt cache file {path} ({problem}); rebuilding it.", stacklevel=3)
        return None
    return Chunks(input_ids, word_ids, n_reviews=n_reviews, n_tokens=n_tokens, cache_path=path)


def _write_cache(path: Path, chunks: Chunks, key: dict, key_hash: str) -> bool:
    """Write `chunks` to `path` atomically; warn and return False if that is impossible."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    metadata = {
        "key": json.dumps(key, sort_keys=True),
        "key_sha256": key_hash,
        "arrays_sha256": _arrays_sha256(chunks.input_ids, chunks.word_ids),
        "n_reviews": str(chunks.n_reviews),
        "n_tokens": str(chunks.n_tokens),
    }
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file in the same folder, then os.replace: readers (another process included) see either
        # no file or a complete one, never a half-written one, and two writers cannot mix their bytes.
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a shared cache folder should stay readable
        tensors = {"input_ids": np.ascontiguousarray(chunks.input_ids),
                   "word_ids": np.ascontiguousarray(chunks.word_ids)}
        save_file(tensors, tmp_name, metadata=metadata)
        os.replace(tmp_name, path)
        tmp_name = None
    except (OSError, SafetensorError) as err:  # e.g. read-only folder, disk full
        warnings.warn(f"Could not write the cache file {path} ({err}); continuing without cache. "
                      "Pass a writable --cache-dir or set MLM_CACHE.", stacklevel=3)
        return False
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.remove(tmp_name)
    return True


# ---------------------------------------------------------------------------------------------------------
# 5. Downsampling


def split_train_test(
    chunks: Chunks, *, train_size: int = 10_000, test_size: int = 1_000, seed: int = 42
) -> tuple[Chunks, Chunks]:
    """Draw disjoint train and test subsets of `chunks`, reproducibly.

    Same indices as `datasets.Dataset.train_test_split(train_size=..., test_size=..., seed=...)` with its
    defaults: permutation = np.random.default_rng(seed).permutation(len(chunks)); test takes the first
    test_size indices, train the next train_size, each in permutation order. Returns (train, test) Chunks of
    shapes (train_size, chunk_size) and (test_size, chunk_size).
    """
    if train_size < 1 or test_size < 1:
        raise MLMError(f"--train-size and --test-size must be positive (got {train_size} and {test_size}).")
    if train_size + test_size > len(chunks):
        raise MLMError(
            f"Cannot draw {train_size} train + {test_size} test chunks from {len(chunks)} chunks: "
            "lower --train-size/--test-size, or use a larger corpus or a smaller --chunk-size."
        )
    permutation = np.random.default_rng(seed).permutation(len(chunks))
    test = chunks.select(permutation[:test_size])
    train = chunks.select(permutation[test_size : test_size + train_size])
    return train, test
