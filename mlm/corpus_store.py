"""A corpus of any size, tokenized and chunked once into a compact store on disk that training memory-maps.

Preparation streams: the files are read in pieces of about PIECE_CHARS characters (mlm/files/corpus_files.py),
tokenized on every core with encode_batch calls kept in flight along the whole stream (`_stream`; faster where
mlm/speed/fast_encode.py shows its shortcuts exact for the tokenizer), cut into chunks
exactly as the course's `group_texts` cuts the whole corpus (the tokens that do not fill a chunk are carried
on), and appended to the store; a piece is the unit of resumption. Memory is bounded by a piece, not by the corpus; a
document longer than SLICE_CHARS is tokenized in slices cut at whitespace.

The store is a folder:

    ids.bin       (N, L) token ids, uint16 when the vocabulary fits in 16 bits, else int32, little-endian
    words.bin     (N, 2, ceil(L / 8)) uint8: two bit planes per chunk, np.packbits of
                  in_word   the token belongs to a word (its word id is not None: not [CLS]/[SEP] of the template)
                  new_word  in_word, and its word id differs from that of the previous in-word token of the stream
    header.json   what the store was built from (the cache key), its shape and dtype, the SHA-256 of both files,
                  and a SHA-256 over every other header field

Word ids rebuilt as the running count of new_word along a chunk (-1 where not in_word) give exactly the word
starts of the course's word ids in `mlm.masking.word_starts`, hence bit-identical whole-word masks: a chunk's
first in-word token starts a word either way, and every later in-word token starts one exactly when its word id
differs from the previous in-word token's, which is what new_word records, across [SEP] [CLS] too.

Interruption: while preparing, the store is `.{name}.partial/` with progress.json, rewritten atomically after each
piece (pieces done, chunks written, the carried tokens). Run the same command again and it truncates the two
files to the chunks recorded, skips the pieces done and continues, so the finished store is byte-identical to an
uninterrupted one. A lock file makes other processes (torchrun's ranks) wait for the one that prepares.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mlm.errors import MLMError
from mlm.files.corpus_files import iter_texts
from mlm.files.hashing import file_sha256, json_sha256
from mlm.speed.fast_encode import fast_encoder
from mlm.tokenizer import Tokenizer, encoded_arrays, template_ids

STORE_FORMAT_VERSION = 1
PIECE_CHARS = 16 << 20  # characters of text per piece: bounds preparation's memory
SLICE_CHARS = 1 << 20  # a longer document is tokenized in slices of about this many characters
SLICES_PER_CALL = 8  # slices per encode_batch call: parallel, and still bounded
# Documents per encode_batch call. The tokenizer parallelises inside a call, so a batch only has to be large enough
# to keep its thread pool busy; 2,000 IMDb reviews (~630k tokens) do. The character bound keeps a batch of long
# documents small.
ENCODE_BATCH_DOCS, ENCODE_BATCH_CHARS = 2_000, 4 << 20
ENCODES_IN_FLIGHT = 2  # encode_batch calls running at once (see `_stream`)
IN_WORD, NEW_WORD = 1, 2  # the flag bits of a token while preparing


def store_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


# ---------------------------------------------------------------------------------------------------------
# Word boundaries as two bits per token


def word_flags(word_ids: np.ndarray, last_word: int) -> tuple[np.ndarray, int]:
    """(flags (T,) uint8 of IN_WORD | NEW_WORD, the last in-word token's word id) for a stretch of the stream.

    word_ids: (T,) int32, -1 at template specials; last_word: the word id of the stream's last in-word token
    before this stretch (-1 if none).
    """
    in_word = word_ids >= 0
    words = word_ids[in_word]
    previous = np.concatenate([[last_word], words[:-1]]).astype(words.dtype)
    flags = in_word.astype(np.uint8)
    flags[in_word] |= (words != previous).astype(np.uint8) * NEW_WORD
    return flags, int(words[-1]) if len(words) else last_word


def pack_flags(flags: np.ndarray) -> np.ndarray:
    """(n, L) uint8 flags -> (n, 2, ceil(L / 8)) uint8 bit planes (in_word, new_word)."""
    planes = np.stack([(flags & IN_WORD) != 0, (flags & NEW_WORD) != 0], axis=1)
    return np.packbits(planes, axis=-1)


def word_ids_from_planes(planes: np.ndarray, chunk_size: int) -> np.ndarray:
    """(n, 2, ceil(L / 8)) uint8 bit planes -> (n, L) int32 word ids, -1 where not in a word."""
    bits = np.unpackbits(planes, axis=-1, count=chunk_size).astype(bool)
    in_word, new_word = bits[:, 0], bits[:, 1]
    return np.where(in_word, np.cumsum(new_word, axis=1, dtype=np.int32), np.int32(-1)).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# Reading a store


class ChunkStore:
    """The chunks of a finished store, memory-mapped: `rows` reads only the rows asked for."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.chunk_size = header["chunk_size"]
        self.n_reviews, self.n_tokens = header["n_reviews"], header["n_tokens"]
        self._maps = None

    def __len__(self) -> int:
        return self.header["n_chunks"]

    def __getstate__(self) -> dict:  # DataLoader workers reopen the files instead of receiving copies
        return {**self.__dict__, "_maps": None}

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            n, length = len(self), self.chunk_size
            ids = np.memmap(self.path / "ids.bin", np.dtype(self.header["dtype"]), "r", shape=(n, length))
            planes = np.memmap(self.path / "words.bin", np.uint8, "r", shape=(n, 2, (length + 7) // 8))
            self._maps = ids, planes
        return self._maps

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, word_ids), both (n, L) int32, of the chunks at `positions` (n,) int, in that order."""
        ids, planes = self._arrays()
        return ids[positions].astype(np.int32), word_ids_from_planes(planes[positions], self.chunk_size)


def open_store(path: Path, key_sha256: str) -> ChunkStore | None:
    """The store at `path`, or None when there is none; a store that cannot be trusted is warned about and None."""
    if not (path / "header.json").is_file():
        return None
    try:
        header = json.loads((path / "header.json").read_text(encoding="utf-8"))
        problem = _header_problem(path, header, key_sha256)
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        warnings.warn(f"Ignoring corrupt chunk store {path} ({problem}); rebuilding it.", stacklevel=3)
        return None
    return ChunkStore(path, header)


def _header_problem(path: Path, header: dict, key_sha256: str) -> str | None:
    fields = {name: value for name, value in header.items() if name != "header_sha256"}
    if header.get("header_sha256") != json_sha256(fields):
        return "its header does not match the header's checksum"
    if header["format_version"] != STORE_FORMAT_VERSION or header["key_sha256"] != key_sha256:
        return "it was built from other data or by another version"
    n, length, dtype = header["n_chunks"], header["chunk_size"], np.dtype(header["dtype"])
    if dtype not in (np.dtype("<u2"), np.dtype("<i4")) or n < 1 or length < 2:
        return f"impossible shape or dtype ({n}, {length}) {dtype}"
    for name, size in (("ids.bin", n * length * dtype.itemsize), ("words.bin", n * 2 * ((length + 7) // 8))):
        if (path / name).stat().st_size != size:
            return f"{name} has {(path / name).stat().st_size} bytes, not {size}"
        # The bytes are checked too: a flipped bit keeps the size.
        if file_sha256(path / name) != header[name.replace(".bin", "_sha256")]:
            return f"{name} does not match its checksum"
    return None


# ---------------------------------------------------------------------------------------------------------
# Preparing a store


def prepare_store(path: Path, key: dict, files: list[Path], tokenizer: Tokenizer, *, chunk_size: int,
                  group_size: int | None, text_column: str = "text", one_document_per_file: bool = False,
                  progress: bool = False) -> ChunkStore:
    """The store at `path` for `key`, built from `files` unless a valid one is there (see the module docstring).

    Raises MLMError for bad input (after which the same command resumes) and OSError when the folder is not
    writable.
    """
    key_sha256 = json_sha256(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    if (store := open_store(path, key_sha256)) is not None:
        return store
    with _locked(path.parent / f".{path.name}.lock"):
        if (store := _finished_meanwhile(path, key_sha256)) is not None:
            return store
        partial = path.parent / f".{path.name}.partial"
        partial.mkdir(exist_ok=True)
        for leftover in partial.glob("*.tmp"):
            leftover.unlink()
        writer = _Writer(partial, key_sha256, store_dtype(tokenizer.vocab_size), chunk_size, group_size)
        pieces = _pieces(files, text_column, one_document_per_file)
        with _progress_bar(files, progress, path.name) as bar:
            for stretch, bytes_read in _stream(pieces, tokenizer, skip=writer.state["pieces"]):
                if stretch is None:
                    writer.end_piece()
                else:
                    writer.add(*stretch)
                bar.update(bytes_read - bar.n)
        header = writer.finish(key, files)
        if path.exists():  # a corrupt store, refused above
            shutil.rmtree(path)
        os.replace(partial, path)
    (path.parent / f".{path.name}.lock").unlink(missing_ok=True)
    return ChunkStore(path, header)


def _finished_meanwhile(path: Path, key_sha256: str) -> ChunkStore | None:
    # Another process held the lock and finished the store while this one waited: use it, quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_store(path, key_sha256)


def remove_leftovers(directory: Path) -> None:
    """Remove the temporary files of writes killed half-way (those of older mlm versions' caches included)."""
    for file in directory.iterdir():
        if file.is_file() and (file.name.startswith(".tmp") or file.name.endswith(".tmp")):
            file.unlink(missing_ok=True)


@contextmanager
def _locked(lock_file: Path):
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another process prepares this store
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _progress_bar(files: list[Path], show: bool, name: str):
    from tqdm import tqdm

    total = sum(file.stat().st_size for file in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"preparing {name}",
               disable=not show, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _pieces(files: list[Path], text_column: str, one_document_per_file: bool) -> Iterator[tuple[list[str], int]]:
    """Yield (texts, bytes read) pieces of about PIECE_CHARS characters, reading the next piece meanwhile."""
    def gather():
        piece, size = [], 0
        for texts, bytes_read in iter_texts(files, text_column=text_column,
                                            one_document_per_file=one_document_per_file):
            # Cut inside a batch too: a reader's batch can be larger than a piece.
            ends = np.cumsum([len(text) for text in texts]) + size
            start = 0
            while start < len(texts) and ends[-1] >= PIECE_CHARS:
                stop = int(np.searchsorted(ends, PIECE_CHARS)) + 1
                yield piece + texts[start:stop], bytes_read
                piece, size, start, ends = [], 0, stop, ends - ends[stop - 1]
            piece += texts[start:]
            size = int(ends[-1]) if len(texts) else size
        if piece:
            yield piece, bytes_read

    # pyarrow parses with the GIL released: reading the next piece hides behind tokenizing this one.
    source = gather()
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(next, source, None)
        while (piece := ahead.result()) is not None:
            ahead = pool.submit(next, source, None)
            yield piece


def _stream(pieces, tokenizer: Tokenizer, *, skip: int = 0):
    """Yield (stretch, bytes read) along the token stream of `pieces` ((texts, bytes read) in order), and
    (None, bytes read) at the end of each piece; the first `skip` pieces are passed over (done before a kill).

    A stretch is (input_ids (T,) int32, word_ids (T,) int32, doc_ends (D,) int64): doc_ends are the offsets just
    past each document's last token in the stretch; a stretch may end inside a document (a long one).

    encode_batch releases the GIL and runs on the tokenizer's thread pool. ENCODES_IN_FLIGHT calls stay in
    flight along the whole stream, piece boundaries included, so the tokenizer keeps every core busy while the
    caller cuts and writes chunks and the next piece is read; at most that many batches of Encodings, a
    batch's arrays each, and the piece being read are alive.
    """
    doc_offset = 0  # word ids of a long document's slices count on from the previous slice's
    with ThreadPoolExecutor(max_workers=ENCODES_IN_FLIGHT) as pool:
        pending = deque()

        def finished():
            nonlocal doc_offset
            future, bytes_read = pending.popleft()
            if future is None:
                return None, bytes_read
            ids, words, doc_ends, continues = future.result()
            if continues:  # a long document's slice, word ids counted from 0 by its job: offset here, in order
                in_word = words >= 0
                words[in_word] += doc_offset
                doc_offset = int(words[in_word].max()) + 1 if in_word.any() else doc_offset
            else:
                doc_offset = 0
            return (ids, words, doc_ends), bytes_read

        for job, bytes_read in _jobs(pieces, tokenizer, skip):
            pending.append((None if job is None else pool.submit(job), bytes_read))
            while sum(future is not None for future, _ in pending) >= ENCODES_IN_FLIGHT:
                yield finished()
        while pending:
            yield finished()


def _jobs(pieces, tokenizer: Tokenizer, skip: int):
    """Yield (job, bytes read): job() returns (input_ids, word_ids, doc_ends, continues) for the next stretch of
    the stream, run on a worker thread; a job None marks the end of a piece. Documents up to SLICE_CHARS go
    ENCODE_BATCH_DOCS (at most ENCODE_BATCH_CHARS characters) per encode_batch call; a longer one in slices."""
    encode = fast_encoder(tokenizer) or plain_encoder(tokenizer)

    def batch_job(texts):
        def job():
            ids, words, lengths = encode(texts, True)
            return ids, words, np.cumsum(lengths), False
        return job

    for index, (texts, bytes_read) in enumerate(pieces):
        if index < skip:
            continue
        batch, chars = [], 0
        for text in texts:
            if len(text) > SLICE_CHARS or len(batch) == ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
                if batch:
                    yield batch_job(batch), bytes_read
                batch, chars = [], 0
            if len(text) > SLICE_CHARS:
                yield from ((job, bytes_read) for job in _long_document_jobs(text, tokenizer, encode))
            else:
                batch.append(text)
                chars += len(text)
        if batch:
            yield batch_job(batch), bytes_read
        yield None, bytes_read


def plain_encoder(tokenizer: Tokenizer):
    """(texts, add_special_tokens) -> (input_ids, word_ids, lengths) as mlm/tokenizer.py's encoded_arrays gives
    them; mlm/speed/fast_encode.py's fast_encoder gives the same arrays faster where it can show that exact."""
    backend = tokenizer.backend
    return lambda texts, special: encoded_arrays(backend.encode_batch(texts, add_special_tokens=special))


def _long_document_jobs(text: str, tokenizer: Tokenizer, encode):
    """One long document as jobs (see `_jobs`): slices cut at whitespace tokenized without the template, which is
    added around the whole. Exact for tokenizers that split words at whitespace (BERT's WordPiece among them)."""
    prefix, suffix = template_ids(tokenizer)
    yield lambda: (prefix, np.full(len(prefix), -1, np.int32), np.zeros(0, np.int64), False)
    slices = list(_slices(text, SLICE_CHARS))

    def slice_job(group):
        def job():
            ids, words, lengths = encode(group, False)
            # Word ids count on through the document, as one encoding's would: each slice's from the end of the
            # previous slice's (every token of a slice is in a word: there is no template).
            ends = np.cumsum(lengths)
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(_word_counts(words, starts, ends))[:-1]])
            words = np.where(words >= 0, words + np.repeat(offsets, lengths).astype(np.int32), words)
            return ids, words, np.zeros(0, np.int64), True
        return job

    for start in range(0, len(slices), SLICES_PER_CALL):
        yield slice_job(slices[start : start + SLICES_PER_CALL])
    yield lambda: (suffix, np.full(len(suffix), -1, np.int32), np.array([len(suffix)], np.int64), False)


def _word_counts(words: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """(R,) int64: one more than the largest word id of each encoding words[starts[r]:ends[r]], 0 if none."""
    return np.array([int(words[a:b].max()) + 1 if b > a else 0 for a, b in zip(starts, ends)], np.int64)


def _slices(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = max(text.rfind(space, start + 1, end) for space in (" ", "\n", "\t", "\r"))
            end = cut if cut > start else end  # no whitespace at all: cut anyway, inside a word
        yield text[start:end]
        start = end


class _Writer:
    """Appends chunks to a partial store, cutting the stream as the course's group_texts does."""

    def __init__(self, partial: Path, key_sha256: str, dtype: np.dtype, chunk_size: int, group_size: int | None):
        self.partial, self.dtype, self.chunk_size, self.group_size = partial, dtype, chunk_size, group_size
        fresh = {"key_sha256": key_sha256, "pieces": 0, "chunks": 0, "documents": 0, "tokens": 0,
                 "last_word": -1, "carry_ids": [], "carry_flags": []}
        self.state = fresh
        progress = partial / "progress.json"
        if progress.is_file():
            try:
                stored = json.loads(progress.read_text(encoding="utf-8"))
                if stored.get("key_sha256") == key_sha256 and set(stored) == set(fresh):
                    self.state = stored
            except (OSError, ValueError):
                pass  # an unreadable progress file: start over
        row_bytes = (chunk_size * dtype.itemsize, 2 * ((chunk_size + 7) // 8))
        # A crash can lose appended bytes that progress.json counts (it is renamed into place, the data is not
        # synced): truncate() would fill the gap with zeros, a store of [PAD] rows that passes its checksums.
        files = (partial / "ids.bin", partial / "words.bin")
        if any(_size(file) < self.state["chunks"] * size for file, size in zip(files, row_bytes)):
            self.state = fresh
        self.carry_ids = np.array(self.state["carry_ids"], np.int32)
        self.carry_flags = np.array(self.state["carry_flags"], np.uint8)
        # Drop whatever a killed run appended after its last completed piece.
        for file, size in zip(files, row_bytes):
            with open(file, "ab") as handle:
                handle.truncate(self.state["chunks"] * size)

    def add(self, ids: np.ndarray, words: np.ndarray, doc_ends: np.ndarray) -> None:
        """Append the chunks completed by a stretch of the stream (see `_stream`)."""
        state = self.state
        flags, state["last_word"] = word_flags(words, state["last_word"])
        rows_ids, rows_flags = self._cut(ids, flags, doc_ends)
        with open(self.partial / "ids.bin", "ab") as ids_file, open(self.partial / "words.bin", "ab") as words_file:
            ids_file.write(rows_ids.astype(self.dtype).tobytes())
            words_file.write(pack_flags(rows_flags).tobytes())
        state["chunks"] += len(rows_ids)
        state["documents"] += len(doc_ends)
        state["tokens"] += len(ids)

    def end_piece(self) -> None:
        """Record a piece as done: a kill from now on resumes after it."""
        state = self.state
        state["pieces"] += 1
        state["carry_ids"], state["carry_flags"] = self.carry_ids.tolist(), self.carry_flags.tolist()
        _write_json(self.partial / "progress.json", state)

    def _cut(self, ids: np.ndarray, flags: np.ndarray, doc_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full chunks of carry + this stretch, (n, L) int32 and uint8; the rest is carried or, at the end of a
        group of group_size documents, dropped."""
        length = self.chunk_size
        stream_ids = np.concatenate([self.carry_ids, ids])
        stream_flags = np.concatenate([self.carry_flags, flags])
        cuts = []
        if self.group_size is not None:
            numbers = self.state["documents"] + np.arange(1, len(doc_ends) + 1)
            cuts = (len(self.carry_ids) + doc_ends[numbers % self.group_size == 0]).tolist()
        kept, start = [], 0
        for end in [*cuts, len(stream_ids)]:
            full = (end - start) // length * length
            kept.append(np.arange(start, start + full))
            start = end if end in cuts else start + full
        keep = np.concatenate(kept)
        self.carry_ids, self.carry_flags = stream_ids[start:], stream_flags[start:]
        return stream_ids[keep].reshape(-1, length), stream_flags[keep].reshape(-1, length)

    def finish(self, key: dict, files: list[Path]) -> dict:
        state = self.state
        if state["documents"] == 0:
            others = f" and {len(files) - 1} other file{'s' * (len(files) > 2)}" if len(files) > 1 else ""
            raise MLMError(f"No text in {files[0]}{others}: empty, or only blank lines. Check the path, or add text.")
        if state["chunks"] == 0:
            per_group = "" if self.group_size is None else f" in any group of {self.group_size} reviews"
            raise MLMError(
                f"The corpus has {state['tokens']} tokens in {state['documents']} reviews, not enough to fill one "
                f"chunk of {self.chunk_size} tokens{per_group}. Use more text or a smaller --chunk-size"
                + ("." if self.group_size is None else " or --group-size."))
        fields = {"format_version": STORE_FORMAT_VERSION, "key": key, "key_sha256": state["key_sha256"],
                  "dtype": self.dtype.str, "chunk_size": self.chunk_size, "n_chunks": state["chunks"],
                  "n_reviews": state["documents"], "n_tokens": state["tokens"],
                  "ids_sha256": file_sha256(self.partial / "ids.bin"),
                  "words_sha256": file_sha256(self.partial / "words.bin")}
        header = {**fields, "header_sha256": json_sha256(fields)}
        _write_json(self.partial / "header.json", header)
        (self.partial / "progress.json").unlink()
        return header


def _write_json(file: Path, value: dict) -> None:
    # Written beside, then renamed over: a kill leaves the old file or the new one, never half of one. open()
    # creates the file with the permissions the umask allows, so a shared cache stays readable to others.
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(value, sort_keys=True), encoding="utf-8")
    os.replace(tmp, file)


def _size(file: Path) -> int:
    return file.stat().st_size if file.is_file() else 0
