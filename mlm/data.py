"""The course's data pipeline: texts -> token ids with word ids -> concatenated -> chunks -> the train/eval draw.

    tokenize            every review becomes [CLS] … [SEP], with each token's word id (-1 at special tokens):
                        what the course's `tokenizer(examples["text"])` plus `word_ids(i)` gives
    chunk               all reviews joined end to end and cut into `chunk_size` blocks, the last partial block
                        dropped (the course's `group_texts`); `group_ends` says where the joining restarts:
                        nowhere by default, or after every `group_size` reviews, as `datasets.map(batched=True,
                        batch_size=group_size)` does, which reproduces the course's chunk counts
    split_train_test    the course's `train_test_split(train_size=10_000, test_size=1_000, seed=42)`

These work on flat numpy arrays: no Python loop per token. A corpus of any size goes through the same functions
piece by piece in mlm/corpus_store.py, which writes their output to disk; mlm/corpus.py gives a run its train and
eval chunks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mlm.chunks import Chunks, draw_size, draw_sizes
from mlm.errors import MLMError, listed
from mlm.tokenizer import Tokenizer

__all__ = ["Chunks", "check_chunk_size", "check_filled", "chunk", "concatenate_splits", "draw", "group_ends",
           "split_train_test", "tokenize", "tokenize_and_chunk"]

# Texts per tokenizer call. The tokenizer parallelises inside a call, so a batch only has to be large enough to keep
# its thread pool busy (2,000 IMDb reviews, ~630k tokens, do); the character bound keeps a batch of long documents
# small. Tokenizing everything in one call would hold an Encoding object per review at once (gigabytes for IMDb).
ENCODE_BATCH_TEXTS, ENCODE_BATCH_CHARS = 2_000, 4 << 20
ENCODE_BATCHES_IN_FLIGHT = 2  # tokenizer calls running at once (see `_encode_ahead`)


# ---------------------------------------------------------------------------------------------------------
# Tokenizing


def tokenize(texts: list[str], tokenizer: Tokenizer, *, special_tokens: bool = True,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize every text with [CLS] … [SEP] around it (unless special_tokens=False) and lay all tokens end to end.

    Returns (input_ids, word_ids, lengths): input_ids and word_ids are (T,) int32 over all T tokens, word_ids
    -1 at special tokens; lengths is (R,) int64, the token count of each of the R texts.
    """
    parts = list(_encode_ahead(tokenizer, _batches(texts), special_tokens))
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    ids, words, lengths = zip(*parts)
    return np.concatenate(ids), np.concatenate(words), np.concatenate(lengths)


def _batches(texts: list[str]) -> list[list[str]]:
    """`texts` cut into runs of at most ENCODE_BATCH_TEXTS texts and (but for a longer single text) about
    ENCODE_BATCH_CHARS characters."""
    batches, start, chars = [], 0, 0
    for end, text in enumerate(texts):
        if end > start and (end - start == ENCODE_BATCH_TEXTS or chars + len(text) > ENCODE_BATCH_CHARS):
            batches.append(texts[start:end])
            start, chars = end, 0
        chars += len(text)
    return batches + [texts[start:]] if start < len(texts) else batches


def _encode_ahead(tokenizer: Tokenizer, batches: list[list[str]], special_tokens: bool):
    """Yield tokenizer.encode(batch) for each batch in order, tokenizing the next batches meanwhile.

    The tokenizer releases the GIL and runs on its own thread pool, so helper threads tokenize ahead while the
    caller works on the current batch's arrays; two calls in flight keep the pool busy while either does its
    serial, GIL-bound list conversions. At most ENCODE_BATCHES_IN_FLIGHT + 1 batches are alive at once.
    """
    with ThreadPoolExecutor(max_workers=ENCODE_BATCHES_IN_FLIGHT) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.submit(tokenizer.encode, batch, special_tokens=special_tokens))
            if len(pending) == ENCODE_BATCHES_IN_FLIGHT:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------------------
# Chunking


def check_chunk_size(chunk_size: int, max_length: int | None = None) -> None:
    """Raise MLMError unless 2 <= chunk_size <= max_length, the model's longest sequence (when given)."""
    if chunk_size < 2:
        raise MLMError(f"`chunk_size` must be at least 2 (got {chunk_size}); the course uses 128.")
    if max_length is not None and chunk_size > max_length:
        raise MLMError(f"`chunk_size` {chunk_size} is longer than the model takes ({max_length} tokens: it has no "
                       "position embedding beyond that). Use at most that.")


def check_group_size(group_size: int | None) -> None:
    """Raise MLMError unless group_size is None or a positive number of reviews."""
    if group_size is not None and group_size < 1:
        raise MLMError(f"`group_size` must be a positive number of reviews (got {group_size}).")


def group_ends(lengths: np.ndarray, group_size: int | None = None) -> np.ndarray:
    """(G,) int64: where each group of reviews ends in the token stream of `tokenize` (lengths (R,) int64): after
    every `group_size` reviews and at the end, or only at the end (one group: the whole corpus)."""
    check_group_size(group_size)
    ends = np.cumsum(lengths)  # where each review ends
    if group_size is None or len(ends) == 0:
        return ends[-1:]
    return np.unique(np.append(ends[group_size - 1 :: group_size], ends[-1]))  # the last group may be shorter


def chunk(input_ids: np.ndarray, word_ids: np.ndarray, group_ends: np.ndarray, *,
          chunk_size: int = 128) -> tuple[np.ndarray, np.ndarray, int]:
    """Cut the token stream of `tokenize` into (N, chunk_size) blocks, word ids alongside, group by group.

    input_ids, word_ids (T,) int32; group_ends (G,) increasing offsets where a group of reviews ends (`group_ends`).
    Each group's tokens are cut into blocks from its start, its last partial block dropped: the course's
    `group_texts`. Tokens after the last group end belong to a group that goes on past this stretch of the stream
    (mlm/corpus_store.py reads a corpus in pieces): they are cut as far as they fill blocks, and `rest` says where
    the leftover begins (len(input_ids) when the stream ends with a group).
    Returns (input_ids, word_ids) (N, chunk_size) int32, and rest.
    """
    starts = np.concatenate([[0], group_ends]).astype(np.int64)
    sizes = np.diff(np.append(starts, len(input_ids)))  # tokens of each group, the open one last
    kept = sizes // chunk_size * chunk_size
    # The stream is a run of kept tokens then a run of dropped ones per group: repeat True kept[g] times and
    # False (sizes[g] - kept[g]) times, group after group.
    keep = np.repeat(np.tile([True, False], len(sizes)), np.stack([kept, sizes - kept], axis=1).ravel())
    rest = int(starts[-1] + kept[-1])
    return input_ids[keep].reshape(-1, chunk_size), word_ids[keep].reshape(-1, chunk_size), rest


def check_filled(n_chunks: int, *, tokens: int, texts: int, chunk_size: int, group_size: int | None,
                 files: Sequence[Path] = ()) -> None:
    """Raise MLMError for a corpus (read from `files`, when given) that filled no chunk."""
    if n_chunks == 0:
        where = f" in {listed([str(file) for file in files], 3)}" if files else ""  # which one: --validation-file?
        per_group = "" if group_size is None else f" in any group of {group_size} document{'s' * (group_size > 1)}"
        raise MLMError(f"The corpus{where} has {tokens} tokens in {texts} document{'s' * (texts != 1)}, not enough "
                       f"to fill one chunk of {chunk_size} tokens{per_group}. Use more text or a smaller `chunk_size`"
                       + ("." if group_size is None else " or `group_size`."))


def tokenize_and_chunk(texts: list[str], tokenizer: Tokenizer, *, chunk_size: int = 128,
                       group_size: int | None = None, files: Sequence[Path] = ()) -> Chunks:
    """Tokenize `texts` (read from `files`, which an error names) and cut them into chunks, in memory: `tokenize`
    then `chunk`.

    Returns Chunks with input_ids and word_ids of shape (N, chunk_size), int32. Raises MLMError for a bad
    chunk_size or a corpus too short to fill a single chunk.
    """
    check_chunk_size(chunk_size)
    input_ids, word_ids, lengths = tokenize(texts, tokenizer)
    chunk_ids, chunk_words, _ = chunk(input_ids, word_ids, group_ends(lengths, group_size), chunk_size=chunk_size)
    check_filled(len(chunk_ids), tokens=len(input_ids), texts=len(texts), chunk_size=chunk_size,
                 group_size=group_size, files=files)
    return Chunks(chunk_ids, chunk_words, n_reviews=len(texts), n_tokens=len(input_ids))


# ---------------------------------------------------------------------------------------------------------
# Downsampling


def split_train_test(chunks: Chunks, *, train_size: int | str = 10_000, test_size: int | str = 1_000,
                     seed: int = 42) -> tuple[Chunks, Chunks]:
    """Draw disjoint train and test subsets of `chunks`, reproducibly.

    Same indices as `datasets.Dataset.train_test_split(train_size=..., test_size=..., seed=...)` with its
    defaults: permutation = np.random.default_rng(seed).permutation(len(chunks)); test takes the first
    test_size indices, train the next train_size, each in permutation order. Returns (train, test) Chunks of
    shapes (train_size, chunk_size) and (test_size, chunk_size), views of `chunks`. See `draw_sizes` for
    train_size "all" and a test_size such as "5%".
    """
    train_size, test_size = draw_sizes(train_size, test_size, len(chunks))
    permutation = np.random.default_rng(seed).permutation(len(chunks))
    test = chunks.select(permutation[:test_size])
    train = chunks.select(permutation[test_size : test_size + train_size])
    return train, test


def draw(chunks: Chunks, size: int | str, *, seed: int = 42, what: str = "train",
         setting: str = "train_size") -> Chunks:
    """`size` chunks drawn without replacement, in the order of np.random.default_rng(seed).permutation."""
    size = draw_size(size, len(chunks), setting)
    if size > len(chunks):
        raise MLMError(f"Cannot draw {size} {what} chunks from {len(chunks)}: give `{setting}` {len(chunks)} or "
                       "less, or use more text or a smaller `chunk_size`.")
    return chunks.select(np.random.default_rng(seed).permutation(len(chunks))[:size])


def concatenate_splits(parts: list[Chunks]) -> Chunks:
    """The chunks of `parts` one after the other (e.g. IMDb's train then unsupervised split), without a copy."""
    if len(parts) == 1:
        return parts[0]
    return Chunks.view(list(parts), None, n_reviews=sum(p.n_reviews for p in parts),
                       n_tokens=sum(p.n_tokens for p in parts))
