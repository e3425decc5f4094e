"""`Chunks`, the data the loop trains on, and what a --train-size or --test-size value means ("all", "5%", a count).

Drawing, selecting and concatenating make views, never copies, so a corpus larger than memory trains as a
small one does: the loop reads each step's rows with `rows()`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from mlm.errors import MLMError


class Chunks:
    """Fixed-size blocks of token ids and the word id of every token: arrays in memory, or a view by index over
    the memory-mapped store of mlm/corpus_store.py.

    input_ids: (N, chunk_size) int32 token ids (it and word_ids read all chunks, `rows(positions)` those asked for).
    word_ids:  (N, chunk_size) int32; the index of the token's word within its review, -1 at [CLS]/[SEP] (from a
        store, the same word starts with other numbers: see mlm/corpus_store.py).
    n_reviews, n_tokens: size of the corpus the chunks were cut from ([CLS]/[SEP] counted, dropped tail
        tokens too); a subset made by `select` or `split_train_test` keeps its parent's figures.
    cache_path: the store these chunks were read from or written to, None if not stored.
    """

    def __init__(self, input_ids: np.ndarray, word_ids: np.ndarray, n_reviews: int, n_tokens: int):
        self._parts, self._indices = [_ArrayRows(np.asarray(input_ids), np.asarray(word_ids))], None
        self.n_reviews, self.n_tokens, self.cache_path = n_reviews, n_tokens, None

    @classmethod
    def view(cls, parts: list, indices: np.ndarray | None, n_reviews: int, n_tokens: int,
             cache_path: Path | None = None) -> Chunks:
        """Chunks made of `parts` (each with len, chunk_size and rows()) end to end, taken at `indices` (or all)."""
        chunks = cls.__new__(cls)
        chunks._parts, chunks._indices = parts, indices
        chunks.n_reviews, chunks.n_tokens, chunks.cache_path = n_reviews, n_tokens, cache_path
        return chunks

    def __len__(self) -> int:
        return len(self._indices) if self._indices is not None else self.drawn_from

    @property
    def chunk_size(self) -> int:
        return self._parts[0].chunk_size

    @property
    def input_ids(self) -> np.ndarray:
        return self._whole()[0]

    @property
    def word_ids(self) -> np.ndarray:
        return self._whole()[1]

    def _whole(self) -> tuple[np.ndarray, np.ndarray]:
        if self._indices is None and len(self._parts) == 1 and isinstance(self._parts[0], _ArrayRows):
            return self._parts[0].input_ids, self._parts[0].word_ids  # no copy
        return self.rows(np.arange(len(self)))

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, word_ids), both (n, L) int32, of the chunks at `positions` (n,) int, in that order."""
        positions = self._in_parts(positions)
        if len(self._parts) == 1:
            return self._parts[0].rows(positions)
        starts = np.cumsum([0] + [len(part) for part in self._parts])
        owner = np.searchsorted(starts, positions, side="right") - 1
        ids = np.empty((len(positions), self.chunk_size), np.int32)
        words = np.empty_like(ids)
        for number, part in enumerate(self._parts):
            mine = owner == number
            ids[mine], words[mine] = part.rows(positions[mine] - starts[number])
        return ids, words

    @property
    def drawn_from(self) -> int:
        """The number of chunks this subset was drawn from by `select` (its own length if it was not)."""
        return sum(len(part) for part in self._parts)

    def select(self, indices: np.ndarray) -> Chunks:
        """The chunks at `indices` (1-D int array), in that order, like `datasets.Dataset.select`: a view."""
        return Chunks.view(self._parts, self._in_parts(indices), self.n_reviews, self.n_tokens)

    def _in_parts(self, positions: np.ndarray) -> np.ndarray:  # int64 positions in the parts laid end to end
        positions = np.asarray(positions, dtype=np.int64)
        return positions if self._indices is None else self._indices[positions]


class _ArrayRows:
    """Chunks held in memory: input_ids and word_ids (N, L) integer arrays."""

    def __init__(self, input_ids: np.ndarray, word_ids: np.ndarray):
        self.input_ids, self.word_ids = input_ids, word_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def chunk_size(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.input_ids[positions].astype(np.int32), self.word_ids[positions].astype(np.int32)


def draw_size(size: int | str, n: int, setting: str) -> int:
    """The number of chunks `size` means out of `n`: an int as it is, "all" all of them, "P%" P percent of them,
    rounded as `datasets`' train_test_split rounds its fractions: a test size up ("5%" of 61,302 is 3,066), a train
    size down, so that "90%" and "10%" together fit. `setting` names it ("train_size" or "test_size")."""
    size = parse_size(size, setting)  # an int too: one below 1 is refused there
    if size == "all":
        return n
    if isinstance(size, str):  # a percentage, checked by parse_size
        share = Fraction(size[:-1]) * n / 100
        if (count := math.ceil(share) if setting == "test_size" else math.floor(share)) == 0:
            raise MLMError(f"`{setting}` {size} of {n} chunk{'s' * (n != 1)} is no chunk at all: give a number of "
                           "chunks, `all` or a larger percentage.")
        return count
    return size


def draw_sizes(train_size: int | str, test_size: int | str, n: int) -> tuple[int, int]:
    """(train, test): the chunk counts train_size and test_size mean out of `n` chunks, checked: both at least one
    and together at most n. train_size "all" is every chunk test_size leaves."""
    test = draw_size(test_size, n, "test_size")
    if train_size == "all" and test >= n:
        fix = ("use a larger corpus or a smaller `chunk_size`: one chunk cannot be both" if n < 2  # even 5% takes it
               else "lower `test_size`, e.g. to 5%")
        raise MLMError(f"`train_size` all leaves no chunk to train on: `test_size` {test_size} takes all {n} "
                       f"chunk{'s' * (n != 1)}: {fix}.")
    train = n - test if train_size == "all" else draw_size(train_size, n, "train_size")
    if train + test > n:
        raise MLMError(f"Cannot draw {train} train + {test} test chunks from {n} chunks: lower `train_size` (`all` "
                       "trains on every chunk not held out) or `test_size`, or use a larger corpus or a smaller "
                       "`chunk_size`.")
    return train, test


def parse_size(text: int | str, setting: str = "train_size") -> int | str:
    """A train_size or test_size value: a positive int, a percentage ("5%", "0.5%") strictly between 0% and 100%,
    or "all" (train_size only); raises MLMError naming `setting`."""
    text = str(text).strip()
    if text == "all" and setting == "train_size":
        return text
    percent = text.endswith("%")
    try:
        value = Fraction(text[:-1]) if percent else int(text)
    except ValueError:
        value = 0
    if percent and not 0 < value < 100:
        raise MLMError(f"`{setting}` {text!r}: give a number of chunks or a percentage strictly between 0% and 100%, "
                       "e.g. 5%.")
    if not percent and value < 1:
        every = ", 'all' (every chunk not held out)" if setting == "train_size" else ""
        raise MLMError(f"`{setting}` {text!r}: give a positive number of chunks{every} or a percentage such as 5%.")
    return text if percent else value
