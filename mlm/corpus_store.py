"""A corpus of any size, tokenized and chunked once into a compact store on disk that training memory-maps.

The store runs mlm/data.py's own functions on the corpus piece by piece: the files are read in pieces of about
PIECE_CHARS characters (mlm/files/corpus_files.py), each piece goes through `tokenize`, and `chunk` cuts the token
stream as it cuts a corpus held in memory: the tokens of a group that goes on past a piece are carried into the
next one. Memory is bounded by a piece, not by the corpus; a document longer than SLICE_CHARS is tokenized in
slices cut at whitespace.

The store is a folder in `default_cache_dir()`/chunks, named by the hash of `cache_key` (everything its chunks
depend on):

    ids.bin       (N, L) token ids, uint16 when the vocabulary fits in 16 bits, else int32, little-endian
    words.bin     (N, 2, ceil(L / 8)) uint8: two bit planes per chunk, np.packbits of `word_starts` (mlm/masking.py)
                  in_word     the token belongs to a word (its word id is not -1: not [CLS]/[SEP] of the template)
                  word_start  it starts a word, by the course's grouping rule, within its chunk
    header.json   what the store was built from (the cache key), its shape and dtype, the SHA-256 of both files,
                  and a SHA-256 over every other header field

Word ids rebuilt as the running count of word starts along a chunk (-1 outside words) are other numbers than the
tokenizer's, but they start words at exactly the same tokens, so whole-word masks come out bit-identical.

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
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import constants
from tqdm import tqdm

from mlm.data import check_filled, chunk, tokenize
from mlm.errors import MLMError
from mlm.files.corpus_files import file_format, iter_texts
from mlm.files.hashing import file_sha256, json_sha256, tokenizer_sha256
from mlm.files.writes import TMP_SUFFIX, atomic_write_text
from mlm.masking import word_starts
from mlm.tokenizer import Tokenizer, template_ids

# Bump when the meaning or layout of a store changes, so old stores are rebuilt rather than misread.
FORMAT_VERSION = 2
PIECE_CHARS = 2 << 20  # characters of text per piece: bounds preparation's memory (docs/corpora.md measures it)
SLICE_CHARS = 1 << 20  # a longer document is tokenized in slices of about this many characters
SLICES_PER_STRETCH = 8  # a long document's slices tokenized (and held) at once
# Where a long document may be cut: a space, tab or newline, and the other Unicode space separators (category Zs:
# no-break, ideographic…), at which every pre-tokenizer here splits words.
BLANKS = " \t\n\r\u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u202f\u205f\u3000"


# ---------------------------------------------------------------------------------------------------------
# Where a store lies


def default_cache_dir() -> Path:
    """$MLM_CACHE if set, else <HF_HOME>/mlm (HF_HOME defaults to ~/.cache/huggingface)."""
    return Path(os.environ.get("MLM_CACHE") or Path(constants.HF_HOME) / "mlm").expanduser()


def cache_key(files: list[Path], tokenizer: Tokenizer, *, chunk_size: int, group_size: int | None, text_column: str,
              one_document_per_file: bool = False) -> dict:
    """Everything the chunks depend on, as a JSON-able dict; its hash names the store.

    Data files are identified by the SHA-256 of their content, not by path + size + mtime: hashing IMDb's corpus
    takes a small fraction of tokenizing it, and buys exactness. A copied or re-downloaded but identical file still
    hits the cache, and a file edited in place always misses it, even when its size and mtime survive (`cp -p`).
    """
    formats = [list(file_format(file)) for file in files]  # the same bytes read as .txt and as .csv are other texts
    return {
        "format_version": FORMAT_VERSION,
        "data_sha256": [file_sha256(file) for file in files],
        "data_formats": formats,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "chunk_size": chunk_size,
        "group_size": group_size,
        "text_column": None if all(suffix == ".txt" for suffix, _ in formats) else text_column,  # no columns there
        "one_document_per_file": one_document_per_file,
    }


def store_path(directory: Path, split: str, chunk_size: int, key: dict) -> Path:
    return directory / "chunks" / f"{split}-{chunk_size}-{json_sha256(key)[:20]}"


# ---------------------------------------------------------------------------------------------------------
# Reading a store


class ChunkStore:
    """The chunks of a finished store, memory-mapped: `rows` reads only the rows asked for."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.chunk_size, self.n_reviews, self.n_tokens = header["chunk_size"], header["n_reviews"], header["n_tokens"]
        self._maps = None

    def __len__(self) -> int:
        return self.header["n_chunks"]

    def __getstate__(self) -> dict:  # DataLoader workers reopen the files instead of receiving copies
        return {**self.__dict__, "_maps": None}

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # as Chunks.rows
        if self._maps is None:
            n, length = len(self), self.chunk_size
            ids = np.memmap(self.path / "ids.bin", np.dtype(self.header["dtype"]), "r", shape=(n, length))
            planes = np.memmap(self.path / "words.bin", np.uint8, "r", shape=(n, 2, (length + 7) // 8))
            self._maps = ids, planes
        ids, planes = self._maps
        in_word, starts = np.unpackbits(planes[positions], axis=-1, count=self.chunk_size).astype(bool).swapaxes(0, 1)
        words = np.where(in_word, np.cumsum(starts, axis=1, dtype=np.int32), np.int32(-1)).astype(np.int32)
        return ids[positions].astype(np.int32), words


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
    if header["key_sha256"] != key_sha256:  # the key holds FORMAT_VERSION
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


def prepare_store(path: Path, key: dict, files: list[Path], tokenizer: Tokenizer, *,
                  progress: str | None = None) -> ChunkStore:
    """The store at `path` for `key`, built from `files` with the key's settings unless a valid one is there.

    Raises MLMError for bad input, leaving nothing behind, and OSError when the folder is not writable.
    """
    key_sha256 = json_sha256(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    if (store := open_store(path, key_sha256)) is not None:
        return store
    partial, lock = path.parent / f".{path.name}.partial", path.parent / f".{path.name}.lock"
    try:
        # Blocks while another process prepares this store; closing the file releases the lock.
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            # Another process held the lock and finished the store while this one waited: use it, quietly.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if (store := open_store(path, key_sha256)) is not None:
                    return store
            partial.mkdir(exist_ok=True)
            remove_leftovers(partial)
            dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<i4")  # the narrowest
            writer = _Writer(partial, key_sha256, dtype, key["chunk_size"], key["group_size"])
            # `progress` labels a bar, drawn on a terminal only: elsewhere (a log file) its carriage returns are noise.
            with tqdm(total=sum(file.stat().st_size for file in files), unit="B", unit_scale=True, unit_divisor=1024,
                      desc=progress, disable=not (progress and sys.stderr.isatty()), leave=False) as bar:
                for index, (texts, bytes_read) in enumerate(_pieces(files, key)):
                    if index >= writer.state["pieces"]:  # the pieces before were done by an interrupted run
                        for stretch in _stretches(texts, tokenizer):
                            writer.add(*stretch)
                        writer.end_piece()
                    bar.update(bytes_read - bar.n)
            # The key hashed the files before they were read: one written to meanwhile would be stored as its old hash.
            if changed := [file for file, digest in zip(files, key["data_sha256"]) if file_sha256(file) != digest]:
                raise MLMError(f"{changed[0]} changed while it was being read; run the same command again once it "
                               "is written.")
            header = writer.finish(key, files)
            if path.exists():  # a corrupt store, refused above
                shutil.rmtree(path)
            os.replace(partial, path)
    except MLMError:
        # Bad input (a wrong column, an unreadable file): once it is fixed the key differs, so what was prepared
        # would never be used. An interruption, by contrast, keeps it for the same command to continue.
        shutil.rmtree(partial, ignore_errors=True)
        lock.unlink(missing_ok=True)
        raise
    lock.unlink(missing_ok=True)
    return ChunkStore(path, header)


def remove_leftovers(directory: Path) -> None:
    """Remove the temporary files of writes killed half-way."""
    for file in directory.iterdir():
        if file.is_file() and file.name.endswith(TMP_SUFFIX):
            file.unlink(missing_ok=True)


def _pieces(files: list[Path], key: dict) -> Iterator[tuple[list[str], int]]:
    """Yield (texts, bytes read) pieces of about PIECE_CHARS characters, reading the next piece meanwhile."""
    def gather():
        piece, size = [], 0
        for texts, bytes_read in iter_texts(files, text_column=key["text_column"],
                                            one_document_per_file=key["one_document_per_file"]):
            for text in texts:  # cut inside a batch too: a reader's batch can be larger than a piece
                piece.append(text)
                size += len(text)
                if size >= PIECE_CHARS:
                    yield piece, bytes_read
                    piece, size = [], 0
        if piece:
            yield piece, bytes_read

    # pyarrow parses with the GIL released: reading the next piece hides behind tokenizing this one.
    source = gather()
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(next, source, None)
        while (piece := ahead.result()) is not None:
            ahead = pool.submit(next, source, None)
            yield piece


def _stretches(texts: list[str], tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A piece's token stream, in order, as stretches (input_ids (T,) int32, word_ids (T,) int32, doc_ends (D,)
    int64): doc_ends are the offsets just past each document's last token in the stretch. Runs of documents go
    through `tokenize` whole; a document longer than SLICE_CHARS in stretches of slices, which may end inside it."""
    for short, run in groupby(texts, key=lambda text: len(text) <= SLICE_CHARS):
        if short:
            ids, words, lengths = tokenize(list(run), tokenizer)
            yield ids, words, np.cumsum(lengths)
        else:
            for text in run:
                yield from _long_document(text, tokenizer)


def _long_document(text: str, tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One long document as stretches (see `_stretches`): slices cut at whitespace, tokenized without the template,
    which is put around the whole. Exact for pre-tokenizers that split at whitespace, BERT's and byte-level BPE's
    (RoBERTa's) among them: no word spans two slices (see `_slices`)."""
    before, after = template_ids(tokenizer)
    yield before, np.full(len(before), -1, np.int32), np.zeros(0, np.int64)
    slices, next_word = list(_slices(text, _cut_blanks(tokenizer))), 0
    for start in range(0, len(slices), SLICES_PER_STRETCH):
        ids, words, lengths = tokenize(slices[start : start + SLICES_PER_STRETCH], tokenizer, special_tokens=False)
        # Word ids count on through the document, as one encoding's would: each slice's from the end of the last.
        ends = np.cumsum(lengths)
        counts = np.array([int(words[a:b].max()) + 1 if b > a else 0 for a, b in zip(ends - lengths, ends)])
        offsets = next_word + np.concatenate([[0], np.cumsum(counts)[:-1]])
        next_word += int(counts.sum())
        yield ids, words + np.repeat(offsets, lengths).astype(np.int32), np.zeros(0, np.int64)
    yield after, np.full(len(after), -1, np.int32), np.array([len(after)], np.int64)


def _slices(text: str, blanks: str = BLANKS) -> Iterator[str]:
    """`text` in slices of at most SLICE_CHARS characters, each cut before the first blank of a run of whitespace
    (`blanks`: not a vertical tab or a form feed, control characters that BERT's normalizer deletes, joining words).
    Byte-level BPE makes the run but its last character a word, that character beginning the next (" word" is
    "Ġword"), and an added token that strips the blanks before it (RoBERTa's <mask>) takes the whole run: with the
    run whole in the next slice, both slices split as the whole text does; cut inside it, not. (BERT's
    pre-tokenizer drops whitespace.) A slice where no run of blanks begins is cut where it is, inside a word."""
    start = 0
    while start < len(text):
        end = cut = min(start + SLICE_CHARS, len(text))
        while end < len(text) and (cut := max(text.rfind(blank, start + 1, cut) for blank in blanks)) > start:
            while cut > start + 1 and text[cut - 1].isspace():  # back to the run's first character, in one pass
                cut -= 1
            if text[cut] in blanks and not text[cut - 1].isspace():
                end = cut
                break
        yield text[start:end]
        start = end


def _cut_blanks(tokenizer: Tokenizer) -> str:
    """The blanks a long document may be cut before: spaces only for a pre-tokenizer that adds a space (or "▁")
    before a text not starting with one, which a slice starting with a newline would get and the whole text not."""
    pre = json.loads(tokenizer.backend.pre_tokenizer.__getstate__()) if tokenizer.backend.pre_tokenizer else {}
    prefixed = any(part.get("add_prefix_space") or part.get("type") == "Metaspace"
                   and part.get("prepend_scheme", "always") != "never" for part in pre.get("pretokenizers", [pre]))
    return " " if prefixed else BLANKS


def pack_words(word_ids: np.ndarray) -> np.ndarray:
    """(n, L) int32 word ids -> (n, 2, ceil(L / 8)) uint8 bit planes (in_word, word_start), as words.bin holds them."""
    starts, in_word = word_starts(torch.from_numpy(word_ids))
    return np.packbits(np.stack([in_word.numpy(), starts.numpy()], axis=1), axis=-1)


class _Writer:
    """Appends the chunks of the token stream to a partial store, carrying what a stretch leaves into the next."""

    def __init__(self, partial: Path, key_sha256: str, dtype: np.dtype, chunk_size: int, group_size: int | None):
        self.partial, self.dtype, self.chunk_size, self.group_size = partial, dtype, chunk_size, group_size
        self.state = {"key_sha256": key_sha256, "pieces": 0, "chunks": 0, "documents": 0, "tokens": 0,
                      "carry_ids": [], "carry_words": []}
        files = (partial / "ids.bin", partial / "words.bin")
        row_bytes = (chunk_size * dtype.itemsize, 2 * ((chunk_size + 7) // 8))
        try:
            stored = json.loads((partial / "progress.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = {}  # no progress file, or an unreadable one: start over
        # A crash can lose appended bytes that progress.json counts (it is renamed into place, the data is not
        # synced): truncate() would fill the gap with zeros, a store of [PAD] rows that passes its checksums.
        if (stored.get("key_sha256") == key_sha256 and set(stored) == set(self.state)
                and all(file.is_file() and file.stat().st_size >= stored["chunks"] * size
                        for file, size in zip(files, row_bytes))):
            self.state = stored
        self.carry_ids = np.array(self.state["carry_ids"], np.int32)
        self.carry_words = np.array(self.state["carry_words"], np.int32)
        # Drop whatever a killed run appended after its last completed piece.
        for file, size in zip(files, row_bytes):
            with open(file, "ab") as handle:
                handle.truncate(self.state["chunks"] * size)

    def add(self, ids: np.ndarray, words: np.ndarray, doc_ends: np.ndarray) -> None:
        """Append the chunks completed by a stretch of the stream (see `_stretches`)."""
        state, carried = self.state, len(self.carry_ids)
        if self.group_size is None:
            ends = np.zeros(0, np.int64)  # one group: the whole corpus, which ends in `finish`
        else:
            numbers = state["documents"] + np.arange(1, len(doc_ends) + 1)  # of the documents ending here
            ends = carried + doc_ends[numbers % self.group_size == 0]
        stream_ids, stream_words = np.concatenate([self.carry_ids, ids]), np.concatenate([self.carry_words, words])
        chunk_ids, chunk_words, rest = chunk(stream_ids, stream_words, ends, chunk_size=self.chunk_size)
        self.carry_ids, self.carry_words = stream_ids[rest:], stream_words[rest:]
        with open(self.partial / "ids.bin", "ab") as ids_file, open(self.partial / "words.bin", "ab") as words_file:
            ids_file.write(chunk_ids.astype(self.dtype).tobytes())
            words_file.write(pack_words(chunk_words).tobytes())
        state["chunks"] += len(chunk_ids)
        state["documents"] += len(doc_ends)
        state["tokens"] += len(ids)

    def end_piece(self) -> None:
        """Record a piece as done: a kill from now on resumes after it."""
        state = self.state
        state["pieces"] += 1
        state["carry_ids"], state["carry_words"] = self.carry_ids.tolist(), self.carry_words.tolist()
        atomic_write_text(self.partial / "progress.json", json.dumps(state, sort_keys=True))

    def finish(self, key: dict, files: list[Path]) -> dict:
        """The header of the finished store; the tokens still carried are the last group's partial chunk, dropped."""
        state = self.state
        if state["documents"] == 0:
            others = f" and {len(files) - 1} other file{'s' * (len(files) > 2)}" if len(files) > 1 else ""
            raise MLMError(f"No text in {files[0]}{others}: empty, or only blank lines. Check the path, or add text.")
        check_filled(state["chunks"], tokens=state["tokens"], texts=state["documents"], chunk_size=self.chunk_size,
                     group_size=self.group_size, files=files)
        fields = {"key": key, "key_sha256": state["key_sha256"], "dtype": self.dtype.str, "chunk_size": self.chunk_size,
                  "n_chunks": state["chunks"], "n_reviews": state["documents"], "n_tokens": state["tokens"],
                  "ids_sha256": file_sha256(self.partial / "ids.bin"),
                  "words_sha256": file_sha256(self.partial / "words.bin")}
        header = {**fields, "header_sha256": json_sha256(fields)}
        atomic_write_text(self.partial / "header.json", json.dumps(header, sort_keys=True))
        (self.partial / "progress.json").unlink()
        return header
