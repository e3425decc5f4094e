"""The course's data pipeline in one place: texts -> token ids with word ids -> concatenated -> chunks -> draw.

    tokenize            every review becomes [CLS] … [SEP], with each token's word id (-1 at special tokens):
                        what the course's `tokenizer(examples["text"])` plus `word_ids(i)` gives
    chunk               all reviews joined end to end and cut into `chunk_size` blocks, the last partial block
                        dropped (the course's `group_texts`); with `group_size` the joining happens per group
                        of reviews, as `datasets.map(batched=True, batch_size=group_size)` does, which
                        reproduces the course's chunk counts
    split_train_test    the course's `train_test_split(train_size=10_000, test_size=1_000, seed=42)`

`load_chunks` runs the first two on a split of a corpus, streaming, into a memory-mapped store that later runs
reuse (mlm/corpus_store.py); `load_train_eval_chunks` gives a run its train and eval chunks: drawn from the train
split as the course does, or the eval chunks from another split or file, the train chunks from several splits.

Everything works on flat numpy arrays: there is no Python loop per token, and per review only the attribute
access needed to pull ids out of the tokenizer's Encoding objects.
"""

from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mlm.chunks import Chunks, draw_size, draw_sizes
from mlm.corpus_store import prepare_store
from mlm.errors import MLMError
from mlm.files.data_cache import cache_key, default_cache_dir, store_path
from mlm.files.data_files import check_validation_file, find_corpus, load_texts, read_texts
from mlm.tokenizer import Tokenizer, encoded_arrays

__all__ = ["Chunks", "chunk", "concatenate", "draw", "load_chunks", "load_texts", "load_train_eval_chunks",
           "split_train_test", "tokenize", "tokenize_and_chunk"]

# Reviews per encode_batch call. The tokenizer parallelises inside a call, so a batch only has to be large
# enough to keep its thread pool busy. Tokenizing everything in one call would hold an Encoding object per
# review at once (gigabytes for IMDb train) and is no faster (docs/performance.md, "Data").
ENCODE_BATCH_SIZE = 2_000
ENCODE_BATCHES_IN_FLIGHT = 2  # encode_batch calls running at once (see `tokenize`)


# ---------------------------------------------------------------------------------------------------------
# Tokenizing and chunking


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
            ids, words, lengths = encoded_arrays(encodings)
            ids_parts.append(ids)
            word_parts.append(words)
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
    Python work left, then mostly hides behind tokenizing. Two calls in flight keep the pool busy while either
    does its serial, GIL-bound list conversions. At most ENCODE_BATCHES_IN_FLIGHT + 1 batches of Encodings are
    alive, whatever the speed of the caller.
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
# A split of a corpus, cached


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

    On a miss, or when the store is truncated or corrupt (a warning says so), the chunks are prepared into a
    store in `cache_dir` (default `default_cache_dir()`)/chunks, streaming, in bounded memory
    (mlm/corpus_store.py); an interrupted preparation continues where it stopped. Returns Chunks of
    chunk_size tokens viewing the memory-mapped store, `cache_path` set; use_cache=False neither reads nor
    writes the store and tokenizes the whole split in memory, as the course does.
    """
    check_chunk_size(chunk_size, max_position_embeddings)
    check_group_size(group_size)
    files, one_document_per_file = find_corpus(source, split, revision=revision)
    reading = dict(text_column=text_column, one_document_per_file=one_document_per_file)
    if not use_cache:
        texts = read_texts(files, **reading)
        return tokenize_and_chunk(texts, tokenizer, chunk_size=chunk_size, group_size=group_size, progress=progress)

    key = cache_key(files, tokenizer, chunk_size=chunk_size, group_size=group_size, **reading)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = store_path(directory, split, chunk_size, key)
    try:
        store = prepare_store(path, key, files, tokenizer, chunk_size=chunk_size, group_size=group_size,
                              progress=progress, **reading)
    except OSError as err:  # e.g. a read-only folder, a full disk
        warnings.warn(f"Could not write the chunk store {path} ({err}); continuing without it. "
                      "Pass a writable --cache-dir or set MLM_CACHE.", stacklevel=2)
        texts = read_texts(files, **reading)
        return tokenize_and_chunk(texts, tokenizer, chunk_size=chunk_size, group_size=group_size, progress=progress)
    return Chunks.view([store], None, store.n_reviews, store.n_tokens, cache_path=path)


# ---------------------------------------------------------------------------------------------------------
# Downsampling


def split_train_test(
    chunks: Chunks, *, train_size: int | str = 10_000, test_size: int | str = 1_000, seed: int = 42
) -> tuple[Chunks, Chunks]:
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
         flag: str = "--train-size") -> Chunks:
    """`size` chunks drawn without replacement, in the order of np.random.default_rng(seed).permutation."""
    size = draw_size(size, len(chunks), flag)
    if size < 1:
        raise MLMError(f"{flag} must be positive (got {size}).")
    if size > len(chunks):
        raise MLMError(f"Cannot draw {size} {what} chunks from {len(chunks)}: pass {flag} {len(chunks)} or less, "
                       "or use more text or a smaller --chunk-size.")
    return chunks.select(np.random.default_rng(seed).permutation(len(chunks))[:size])


def concatenate(parts: list[Chunks]) -> Chunks:
    """The chunks of `parts` one after the other (e.g. IMDb's train then unsupervised split), without a copy."""
    if len(parts) == 1:
        return parts[0]
    return Chunks.view(list(parts), None, n_reviews=sum(p.n_reviews for p in parts),
                       n_tokens=sum(p.n_tokens for p in parts))


def load_train_eval_chunks(
    source: str | Path,
    tokenizer: Tokenizer,
    *,
    train_splits: tuple[str, ...] | list[str] = ("train",),
    eval_split: str | None = None,
    validation_file: str | Path | None = None,
    train_size: int | str = 10_000,
    test_size: int | str = 1_000,
    seed: int = 42,
    **load_args,
) -> tuple[Chunks, Chunks]:
    """(train chunks, eval chunks) of a run, (train_size, L) and (test_size, L); `load_args` go to `load_chunks`.

    By default both are drawn from the chunks of `train_splits` with `split_train_test`, as the course draws
    them from IMDb's train split. With `eval_split` (a split of `source`, e.g. "test") or `validation_file` (one
    data file), the eval chunks are drawn from there instead and the train chunks from all of `train_splits`,
    concatenated in the order given (e.g. train then unsupervised). Each split is cached on its own.
    """
    train_splits = list(train_splits)
    if not train_splits or len(set(train_splits)) != len(train_splits):
        raise MLMError(f"--train-splits must name each split once, got {','.join(train_splits) or 'nothing'}.")
    if eval_split is not None and validation_file is not None:
        raise MLMError("--eval-split and --validation-file both name the eval data: pass one of them.")
    if eval_split is not None and eval_split in train_splits:
        raise MLMError(f"--eval-split {eval_split} is also a training split: the eval chunks would be trained on. "
                       "Pick another split, or leave --eval-split out to hold chunks out of the train split.")
    train = concatenate([load_chunks(source, split, tokenizer, **load_args) for split in train_splits])
    if eval_split is None and validation_file is None:
        return split_train_test(train, train_size=train_size, test_size=test_size, seed=seed)
    if validation_file is not None:
        check_validation_file(validation_file)
        held_out = load_chunks(validation_file, "train", tokenizer, **load_args)  # a single file's one split
        name = str(validation_file)
    else:
        held_out = load_chunks(source, eval_split, tokenizer, **load_args)
        name = f"the {eval_split} split"
    return (draw(train, train_size, seed=seed, what="train"),
            draw(held_out, test_size, seed=seed, what=f"eval ({name})", flag="--test-size"))
