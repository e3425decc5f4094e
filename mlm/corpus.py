"""A corpus as a run's chunks: each split tokenized and chunked once by mlm/data.py's functions into the store of
mlm/corpus_store.py (reused by later runs), and the train and eval draw of a run."""

from __future__ import annotations

import warnings
from pathlib import Path

from mlm.chunks import Chunks
from mlm.corpus_store import cache_key, default_cache_dir, prepare_store, store_path
from mlm.data import check_chunk_size, check_group_size, concatenate_splits, draw, split_train_test, tokenize_and_chunk
from mlm.errors import MLMError
from mlm.files.data_files import check_validation_file, find_corpus, read_texts
from mlm.files.hub import short_name
from mlm.tokenizer import Tokenizer


def load_chunks(source: str | Path, split: str, tokenizer: Tokenizer, *, chunk_size: int = 128,
                group_size: int | None = None, text_column: str = "text", revision: str | None = None,
                cache_dir: str | Path | None = None, max_length: int | None = None,
                use_cache: bool = True, progress: bool = False) -> Chunks:
    """The chunks of `split` of `source` (a Hub dataset id, a folder, a glob or a file: mlm/files/data_files.py).

    From the store in `cache_dir` (default `default_cache_dir()`) when a valid one exists; else prepared into it,
    streaming, in bounded memory (mlm/corpus_store.py). Returns Chunks of chunk_size tokens viewing the memory-mapped
    store, `cache_path` set. use_cache=False neither reads nor writes a store: the whole split in memory, as the course.
    """
    check_chunk_size(chunk_size, max_length)
    check_group_size(group_size)
    files, one_document_per_file = find_corpus(source, split, revision=revision)
    reading = dict(text_column=text_column, one_document_per_file=one_document_per_file)
    if use_cache:
        key = cache_key(files, tokenizer, chunk_size=chunk_size, group_size=group_size, **reading)
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = store_path(directory, split, chunk_size, key)
        try:
            label = f"tokenizing {short_name(source)} ({split})" if progress else None  # the progress bar's
            store = prepare_store(path, key, files, tokenizer, progress=label)
            return Chunks.view([store], None, store.n_reviews, store.n_tokens, cache_path=path)
        except OSError as err:  # e.g. a read-only folder, a full disk
            warnings.warn(f"Could not write the chunk store {path} ({err}); continuing without it. "
                          "Give a writable `cache_dir` or set MLM_CACHE.", stacklevel=2)
    return tokenize_and_chunk(read_texts(files, **reading), tokenizer, chunk_size=chunk_size, group_size=group_size,
                              files=files)


def run_sources(dataset: str | Path, *, train_splits: tuple[str, ...] = ("train",), eval_split: str | None = None,
                validation_file: str | Path | None = None) -> tuple[list[tuple], tuple | None]:
    """What a run reads, as (source, split) pairs: its training splits, and where its eval chunks come from (None:
    held out of the training chunks, as the course does)."""
    if not train_splits or len(set(train_splits)) != len(train_splits):
        raise MLMError(f"`train_splits` must name each split once, got {','.join(train_splits) or 'nothing'}.")
    if eval_split is not None and validation_file is not None:
        raise MLMError("`eval_split` and `validation_file` both name the eval data: give one of them.")
    if eval_split is not None and eval_split in train_splits:
        raise MLMError(f"`eval_split` {eval_split} is also a training split: the eval chunks would be trained on. "
                       "Pick another split, or leave `eval_split` out to hold chunks out of the train split.")
    train = [(dataset, split) for split in train_splits]
    if validation_file is not None:
        check_validation_file(validation_file)
        return train, (validation_file, "train")  # a single file's one split
    return train, (dataset, eval_split) if eval_split is not None else None


def unused_validation_split(dataset: str | Path, *, train_splits: tuple[str, ...], eval_split: str | None,
                            validation_file: str | Path | None) -> str | None:
    """A note when a local folder laid out by split has a validation split that the run leaves unused, holding its
    eval chunks out of the training chunks as the course does (IMDb has none)."""
    folder = Path(dataset).expanduser()
    if eval_split is not None or validation_file is not None or "validation" in train_splits or not folder.is_dir():
        return None
    if not any(folder.glob("validation*")) and not any(folder.glob("*/validation*")):
        return None  # where a split file would lie: a large folder of documents is not walked again
    with warnings.catch_warnings():  # said already, when the training split was found
        warnings.simplefilter("ignore")
        try:
            find_corpus(dataset, "validation")
        except MLMError:
            return None
    return (f"{short_name(dataset)} has a validation split, which this run leaves unused: its eval chunks are held "
            "out of the training chunks, as the course does. --eval-split validation scores on it instead.")


def load_train_eval_chunks(source: str | Path, tokenizer: Tokenizer, *, train_splits: tuple[str, ...] = ("train",),
                           eval_split: str | None = None, validation_file: str | Path | None = None,
                           train_size: int | str | None = 10_000, test_size: int | str = 1_000, seed: int = 42,
                           **load_args) -> tuple[Chunks | None, Chunks]:
    """(train chunks, eval chunks) of a run, (train_size, L) and (test_size, L); `load_args` go to `load_chunks`.

    By default both are drawn from the chunks of `train_splits` with `split_train_test`, as the course draws
    them from IMDb's train split. With `eval_split` (a split of `source`, e.g. "test") or `validation_file` (one
    data file), the eval chunks are drawn from there instead and the train chunks from all of `train_splits`,
    concatenated in the order given (e.g. train then unsupervised). Each split is stored on its own.
    train_size None draws the eval chunks alone (None for the train ones), to score models: they are the same,
    as the eval chunks are drawn first (`split_train_test`).
    """
    train_sources, held_out = run_sources(source, train_splits=train_splits, eval_split=eval_split,
                                          validation_file=validation_file)

    def train_chunks() -> Chunks:
        return concatenate_splits([load_chunks(path, split, tokenizer, **load_args) for path, split in train_sources])

    if held_out is None:
        if train_size is None:
            return None, draw(train_chunks(), test_size, seed=seed, what="eval", setting="test_size")
        return split_train_test(train_chunks(), train_size=train_size, test_size=test_size, seed=seed)
    name = str(validation_file) if validation_file is not None else f"the {eval_split} split"
    test = draw(load_chunks(*held_out, tokenizer, **load_args), test_size, seed=seed, what=f"eval ({name})",
                setting="test_size")
    return None if train_size is None else draw(train_chunks(), train_size, seed=seed, what="train"), test
