"""Masking for masked-language-model training: token-level 80/10/10, whole-word masking, frozen eval masks.

Read top to bottom:

1. `special_tokens_mask`: which positions may never be masked.
2. `mask_tokens`: token-level masking, bit-identical to transformers' `DataCollatorForLanguageModeling`
   (5.24 and 4.x) given the same torch RNG state, and leaving the RNG in the same state.
3. `word_starts`, `apply_word_selection`, `mask_whole_words`: whole-word masking on the tokenizer's word ids.
4. `MaskingCollator`: a masking configuration that masks stacked batches (`mask`) or collates rows (`__call__`).
5. `freeze_eval_masks`: masks the eval set once, with its own seed, so perplexity is deterministic.

Randomness, one rule: every function draws from the `generator` it is given (None: torch's global RNG, as the
reference), always the same draws in the same order for a given shape (docs/reference.md#masking-draws).
- Training (mlm/train.py, `StepBatches`) seeds a fresh generator for each optimizer step from (seed, epoch,
  step) and calls `MaskingCollator.mask(..., generator=...)` on the whole global batch. The masks therefore
  depend neither on DataLoader workers, nor on processes or gradient accumulation, nor on resumption.
- Evaluation masks its chunks once, in `freeze_eval_masks`, with a generator seeded by `--data-seed` (not
  `--seed`), so runs with different seeds are scored on the same targets.
- Using the collator on its own, as a DataLoader `collate_fn` (`MaskingCollator(..., seed=s)(rows)`), each
  process draws from its own generator seeded s + DataLoader worker id, as the reference's seeded collator:
  the API for masking outside mlm's loop (tests/test_masking.py checks it against the reference collator).

Conventions: B is the batch size and L the sequence length. Every function takes (B, L) ids of any integer dtype
(torch tensors or numpy arrays), never modifies them in place, and returns new tensors (ids and labels int64).
Labels hold -100 (the value `cross_entropy` ignores) everywhere except at the selected positions, where they hold
the original id.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mlm.constants import IGNORE_INDEX  # -100: positions cross_entropy skips (the reference collator's label value)
from mlm.errors import MLMError
from mlm.masking_inputs import (
    as_ids,
    check_probability,
    check_replace_probs,
    check_same_shape,
    check_vocab,
    row_field,
    stack_rows,
)

# The reference builds its probability tensors with torch.full(shape, p) in the default dtype, float32. The
# bernoulli draw compares a uniform sample with p *as stored*, so a float64 matrix selects different positions
# (docs/reference.md#masking-draws). We pin float32 so a changed torch default dtype cannot alter the masks.
PROB_DTYPE = torch.float32


# ---------------------------------------------------------------------------------------------------------------
# 1. Positions that are never masked.


def special_tokens_mask(input_ids, special_token_ids: Sequence[int]) -> torch.Tensor:
    """True where `input_ids` is one of `special_token_ids`.

    input_ids: (B, L) integers. Returns (B, L) bool.

    This is what the reference computes when the batch has no `special_tokens_mask` column (the HF course flow):
    membership in all special ids, so [CLS]/[SEP] in the middle of a concatenated chunk, [PAD], [UNK] and a
    literal [MASK] are all excluded. Pass `Tokenizer.special_token_ids`.
    """
    ids = as_ids("input_ids", input_ids)  # int64: torch.isin has no unsigned kernels, and the store keeps uint16
    return torch.isin(ids, torch.tensor(list(special_token_ids), dtype=ids.dtype))


# ---------------------------------------------------------------------------------------------------------------
# 2. Token-level masking (BERT's 80/10/10).


def mask_tokens(
    input_ids,
    special_tokens_mask,
    *,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select tokens with `mlm_probability`; of those, [MASK] / random id / unchanged in the given split.

    input_ids: (B, L) integer ids (not modified). special_tokens_mask: (B, L) bool or 0/1, True/1 where a position
    must never be selected (specials and padding). generator: a `torch.Generator`, or None for torch's global one.
    Returns (input_ids, labels), both (B, L) int64.

    Given the same RNG state the result is bit-identical to `DataCollatorForLanguageModeling(mlm_probability,
    mask_replace_prob, random_replace_prob)` on the same padded batch, and the RNG ends in the same state,
    because we make the same four draws, in the same order, on the same full (B, L) shape.
    """
    mlm_probability = check_probability("mlm_probability", mlm_probability)
    mask_replace_prob, random_replace_prob = check_replace_probs(mask_replace_prob, random_replace_prob)
    check_vocab(mask_token_id, vocab_size)
    inputs = as_ids("input_ids", input_ids)  # (B, L) int64, our own copy
    no_mask = torch.as_tensor(special_tokens_mask).bool()  # (B, L)
    check_same_shape(inputs, no_mask, "special_tokens_mask")
    shape = inputs.shape

    # Draw 1: which tokens are predicted. Special positions get probability 0 (bernoulli consumes the same random
    # numbers whatever p is, so zeroing changes the outcome there and nowhere else).
    probability = torch.full(shape, mlm_probability, dtype=PROB_DTYPE).masked_fill_(no_mask, 0.0)
    selected = torch.bernoulli(probability, generator=generator).bool()  # (B, L)
    labels = torch.where(selected, inputs, IGNORE_INDEX)  # original ids at selected positions

    # Draw 2: which selected tokens become [MASK]. Drawn over the full shape, then restricted to `selected`.
    replaced = torch.bernoulli(torch.full(shape, mask_replace_prob, dtype=PROB_DTYPE), generator=generator).bool()
    replaced &= selected
    inputs.masked_fill_(replaced, mask_token_id)

    # The reference stops here (no further draws, so the RNG advances less) when nothing can be random.
    if mask_replace_prob == 1 or random_replace_prob == 0:
        return inputs, labels

    # Draw 3: of the selected tokens NOT replaced by [MASK], which get a random id. The probability is rescaled to
    # the remainder (0.1 / 0.2 = 0.5000000000000001 in Python, exactly 0.5 in float32): a bernoulli(0.1) over all
    # selected tokens would be a different split (docs/reference.md#masking-draws).
    random_prob = random_replace_prob / (1 - mask_replace_prob)
    randomized = torch.bernoulli(torch.full(shape, random_prob, dtype=PROB_DTYPE), generator=generator).bool()
    randomized &= selected & ~replaced

    # Draw 4: random ids for the full (B, L) shape, not just for the `randomized` positions: drawing
    # fewer numbers would give other ids and shift every later draw. Any id in [0, vocab_size) can come out,
    # specials and the original token included, exactly as in the reference.
    random_ids = torch.randint(vocab_size, shape, dtype=torch.int64, generator=generator)
    inputs = torch.where(randomized, random_ids, inputs)
    # The remaining selected tokens keep their original id (the "10% unchanged").
    return inputs, labels


# ---------------------------------------------------------------------------------------------------------------
# 3. Whole-word masking.
#
# Words are the tokenizer's word ids (`Encoding.word_ids()`, -1 where it gives None: specials and padding). That
# works for any fast tokenizer, unlike guessing words from '##' prefixes. The grouping rule is the HF course's
# collator (chapter 7; docs/reference.md#whole-word-masking), scanned per row:
#
#     a non-special token whose word id differs from the word id of the previous NON-special token in the same
#     row (or that has no previous non-special token) starts a new word; special tokens belong to no word and do
#     not reset the scan.
#
# Consequence worth knowing: chunks concatenate reviews and word ids restart at 0 in each review, so in
# "... wow [SEP] [CLS] bad ..." with word ids "... 0 -1 -1 0 ..." the two tokens form ONE word, as in the course.
# With the cumulative word ids of transformers 5.24's offset-based `whole_word_mask=True` (which never repeat
# across a special), the same rule gives that collator's words.


def word_starts(word_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Word boundaries from word ids.

    word_ids: (B, L) integers, negative (conventionally -1) at special and padding positions.
    Returns (starts, in_word), both (B, L) bool: `starts` is True at the first token of each word (the course's
    grouping rule above), `in_word` is True at every non-special token.
    """
    if isinstance(word_ids, np.ndarray):  # a store's rows are read-only, which torch warns of sharing
        word_ids = word_ids.astype(np.int64)
    word_ids = torch.as_tensor(word_ids).long()
    if word_ids.dim() != 2:
        raise MLMError(f"word_ids must be a 2-D (batch, length) array, got shape {tuple(word_ids.shape)}.")
    in_word = word_ids >= 0
    positions = torch.arange(word_ids.shape[1]).expand_as(word_ids)
    # Forward-fill: for every position, the index of the last non-special token at or before it (-1 if none).
    last_word_pos = torch.where(in_word, positions, -1).cummax(dim=1).values
    # ... shifted right by one: the last non-special token strictly before each position.
    prev_pos = torch.cat([torch.full_like(last_word_pos[:, :1], -1), last_word_pos[:, :-1]], dim=1)
    prev_id = word_ids.gather(1, prev_pos.clamp(min=0))
    starts = in_word & ((prev_pos < 0) | (prev_id != word_ids))
    return starts, in_word


def _word_start_index(starts: torch.Tensor, in_word: torch.Tensor) -> torch.Tensor:
    """(B, L) int64: for each token, the flat index (into the (B, L) grid) of the first token of its word.

    A word's tokens are all the non-special tokens from its start up to the next start, so a forward-fill of the
    start positions finds it (specials in between are skipped, matching the rule). Special positions get index 0;
    callers AND with `in_word`. Reading any (B, L) tensor through this index broadcasts the value held at each
    word's first token to the whole word, with one gather and no Python loop.
    """
    batch, length = starts.shape
    flat = torch.arange(batch * length).view(batch, length)
    return torch.where(starts, flat, -1).cummax(dim=1).values.clamp(min=0)


def _per_word(values: torch.Tensor, start_index: torch.Tensor, in_word: torch.Tensor) -> torch.Tensor:
    """Broadcast the (B, L) bool `values` at word starts to every token of the word; False at specials."""
    return values.flatten()[start_index] & in_word


def apply_word_selection(
    input_ids, word_ids, word_selected, *, mask_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask the words chosen by a GIVEN selection: every token of a chosen word becomes [MASK].

    input_ids, word_ids: (B, L) integers (word id < 0 at specials/padding). word_selected: (n_words,) bool or
    0/1, one entry per word in scan order (row by row, left to right), i.e. the course collator's per-row
    `np.random.binomial(1, p, (n_groups,))` draws concatenated. Returns (input_ids, labels), (B, L) int64.

    This is the course collator's masking step without its RNG, so tests can feed it the course's own draw.
    """
    inputs = as_ids("input_ids", input_ids)
    starts, in_word = word_starts(word_ids)
    check_same_shape(inputs, starts, "word_ids")
    chosen = torch.as_tensor(word_selected).bool().flatten()
    n_words = int(starts.sum())
    if chosen.numel() != n_words:
        raise MLMError(f"word_selected has {chosen.numel()} entries but word_ids define {n_words} words.")
    # Put each word's decision on its first token, then broadcast to the whole word.
    at_starts = torch.zeros_like(starts)
    at_starts[starts] = chosen  # boolean indexing is row-major, i.e. scan order
    selected = _per_word(at_starts, _word_start_index(starts, in_word), in_word)
    labels = torch.where(selected, inputs, IGNORE_INDEX)
    return inputs.masked_fill_(selected, mask_token_id), labels


def mask_whole_words(
    input_ids,
    word_ids,
    *,
    mask_token_id: int,
    vocab_size: int,
    wwm_probability: float = 0.2,
    mask_replace_prob: float = 1.0,
    random_replace_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select each word with `wwm_probability` and mask all of its tokens together.

    input_ids, word_ids: (B, L) integers; word id < 0 marks specials and padding, which are never selected.
    Words follow the grouping rule above. With the defaults every token of a chosen word becomes [MASK] (the
    course's collator); with mask_replace_prob < 1 the [MASK] / random / unchanged choice is made once per word
    (a randomized word gets an independent random id on each of its tokens).
    Returns (input_ids, labels), both (B, L) int64.

    Draws, all over the full (B, L) grid (so the RNG use depends only on the shape, never on the words):
      1. bernoulli of a float32 matrix holding `wwm_probability` at word starts and 0 elsewhere: a word is
         selected iff its first token's draw is 1;
      2. bernoulli(mask_replace_prob), read at word starts: the word becomes [MASK];
      then, unless mask_replace_prob == 1 or random_replace_prob == 0,
      3. bernoulli(random_replace_prob / (1 - mask_replace_prob)), read at word starts: random ids;
      4. randint(vocab_size, (B, L)): the random ids themselves, one per token.
    This is the draw sequence of transformers 5.24's `DataCollatorForLanguageModeling(whole_word_mask=True)`, so
    given its probabilities (its `mlm_probability` as `wwm_probability`, its replace probabilities) and that
    collator's word ids, the output and RNG state are bit-identical to it.
    """
    wwm_probability = check_probability("wwm_probability", wwm_probability)
    mask_replace_prob, random_replace_prob = check_replace_probs(mask_replace_prob, random_replace_prob)
    check_vocab(mask_token_id, vocab_size)
    inputs = as_ids("input_ids", input_ids)  # (B, L) int64 copy
    starts, in_word = word_starts(word_ids)  # (B, L) bool each
    check_same_shape(inputs, starts, "word_ids")
    start_index = _word_start_index(starts, in_word)  # (B, L) int64
    shape = inputs.shape

    probability = torch.zeros(shape, dtype=PROB_DTYPE).masked_fill_(starts, wwm_probability)
    selected = _per_word(torch.bernoulli(probability, generator=generator).bool(), start_index, in_word)
    labels = torch.where(selected, inputs, IGNORE_INDEX)

    draw = torch.bernoulli(torch.full(shape, mask_replace_prob, dtype=PROB_DTYPE), generator=generator).bool()
    replaced = _per_word(draw, start_index, in_word) & selected
    inputs.masked_fill_(replaced, mask_token_id)
    if mask_replace_prob == 1 or random_replace_prob == 0:
        return inputs, labels

    random_prob = random_replace_prob / (1 - mask_replace_prob)
    draw = torch.bernoulli(torch.full(shape, random_prob, dtype=PROB_DTYPE), generator=generator).bool()
    randomized = _per_word(draw, start_index, in_word) & selected & ~replaced
    random_ids = torch.randint(vocab_size, shape, dtype=torch.int64, generator=generator)
    return torch.where(randomized, random_ids, inputs), labels


# ---------------------------------------------------------------------------------------------------------------
# 4. The collate function.


@dataclass
class MaskingCollator:
    """A masking configuration: `mask(...)` masks a stacked batch (what training calls); calling the collator,
    `MaskingCollator(...)(rows)`, collates rows.

    `MaskingCollator(...)(rows) -> {"input_ids", "labels"}` is the standalone DataLoader `collate_fn` API, for masking
    outside mlm's loop. rows: a list of dicts with "input_ids" (and "word_ids" for whole-word masking), or of
    tuples (input_ids, word_ids); each entry a 1-D numpy array, tensor or list. Word ids are -1 at specials.
    Returns {"input_ids": (B, L) int64, "labels": (B, L) int64}, plus "attention_mask" (B, L) int64 only when
    the rows have different lengths: shorter rows are then right-padded with `pad_token_id` (word id -1), and
    padding is never masked.

    Token mode masks exactly like `mask_tokens` with `special_token_ids` excluded (the reference collator without a
    special-tokens column); whole-word mode like `mask_whole_words`. `mask_replace_prob`/`random_replace_prob`
    default to each mode's reference values (0.8/0.1 for tokens, 1.0/0.0 for whole words).

    Randomness (see the module docstring): `mask` draws from the generator passed to it, which is how training
    uses the collator. As a collate_fn, `collator(rows)` draws from the global RNG with `seed=None` (the
    reference's default), or with a seed from a `torch.Generator` the collator creates lazily on its first call
    in each process: seed in the main process, seed + worker id inside a DataLoader worker (as the reference
    does). Creating it lazily is why no `worker_init_fn` is needed: the worker id is only known inside the
    worker, and a generator inherited from the parent (fork) or rebuilt from a pickle (spawn) is detected by its
    process id and replaced. Workers thus draw different masks while a run stays reproducible for a given seed
    and number of workers.
    """

    mask_token_id: int
    vocab_size: int
    special_token_ids: Sequence[int]
    pad_token_id: int = 0
    whole_word: bool = False
    mlm_probability: float = 0.15
    wwm_probability: float = 0.2
    mask_replace_prob: float | None = None
    random_replace_prob: float | None = None
    seed: int | None = None
    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)
    _generator_pid: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        default_mask, default_random = (1.0, 0.0) if self.whole_word else (0.8, 0.1)
        if self.mask_replace_prob is None:
            self.mask_replace_prob = default_mask
        if self.random_replace_prob is None:
            self.random_replace_prob = default_random
        # Fail at construction, not in the middle of the first epoch.
        check_probability("mlm_probability", self.mlm_probability)
        check_probability("wwm_probability", self.wwm_probability)
        check_replace_probs(self.mask_replace_prob, self.random_replace_prob)
        check_vocab(self.mask_token_id, self.vocab_size)
        self.special_token_ids = tuple(int(i) for i in self.special_token_ids)

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs) -> MaskingCollator:
        """Build from an `mlm.tokenizer.Tokenizer` (mask id, vocabulary size, special ids, pad id)."""
        return cls(mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size,
                   special_token_ids=tokenizer.special_token_ids, pad_token_id=tokenizer.pad_token_id, **kwargs)

    @property
    def generator(self) -> torch.Generator | None:
        """This process's generator (None when seed is None: the global RNG)."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator_pid != os.getpid():
            worker = torch.utils.data.get_worker_info()
            self._generator = torch.Generator().manual_seed(self.seed + (worker.id if worker is not None else 0))
            self._generator_pid = os.getpid()
        return self._generator

    def __getstate__(self) -> dict:
        # DataLoader workers started with spawn get a pickled copy; they build their own generator anyway.
        state = self.__dict__.copy()
        state["_generator"] = None
        state["_generator_pid"] = None
        return state

    def __call__(self, rows: Sequence) -> dict[str, torch.Tensor]:
        """The DataLoader collate_fn API: stack (and pad) `rows`, then mask them with the collator's generator."""
        if len(rows) == 0:
            raise MLMError("MaskingCollator got an empty list of rows.")
        ids = [row_field(row, "input_ids", 0) for row in rows]
        words = [row_field(row, "word_ids", 1) for row in rows] if self.whole_word else None
        input_ids, word_ids, attention_mask = stack_rows(ids, words, pad_token_id=self.pad_token_id)
        batch = self.mask(input_ids, word_ids, attention_mask, generator=self.generator)
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        return batch

    def mask(self, input_ids: torch.Tensor, word_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, *, generator: torch.Generator | None = None
             ) -> dict[str, torch.Tensor]:
        """Mask an already stacked batch: input_ids/word_ids/attention_mask (B, L) int64 -> {"input_ids", "labels"}.

        Draws from `generator` (None: the global RNG), not from the collator's own seeded one. The training loop
        calls this with one generator per optimizer step, seeded from (seed, epoch, step).
        """
        if self.whole_word:
            if word_ids is None:
                raise MLMError("Whole-word masking needs word_ids.")
            input_ids, labels = mask_whole_words(
                input_ids, word_ids, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                wwm_probability=self.wwm_probability, mask_replace_prob=self.mask_replace_prob,
                random_replace_prob=self.random_replace_prob, generator=generator)
        else:
            no_mask = special_tokens_mask(input_ids, self.special_token_ids)
            if attention_mask is not None:
                no_mask |= attention_mask == 0
            input_ids, labels = mask_tokens(
                input_ids, no_mask, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                mlm_probability=self.mlm_probability, mask_replace_prob=self.mask_replace_prob,
                random_replace_prob=self.random_replace_prob, generator=generator)
        return {"input_ids": input_ids, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------
# 5. Frozen eval masks.
#
# The reference masks the eval set anew at every evaluation with the global RNG, so its perplexity moves with the
# RNG state (and an evaluate() before train() shifts all later masks). We mask the eval chunks ONCE, with a
# private generator seeded by `seed`, over the whole (N, L) array in one call: the targets then depend neither
# on the global RNG, nor on the eval batch size, nor on what ran before, and two models evaluated on the same
# frozen set are compared on identical targets. Use the token-level set for every model (also ones trained
# with whole-word masking); a whole-word frozen set can be reported as well, labelled as such.


def freeze_eval_masks(input_ids, word_ids=None, *, seed: int, **masking) -> dict[str, torch.Tensor]:
    """Mask the eval chunks once, deterministically: {"input_ids": (N, L) int64, "labels": (N, L) int64}.

    input_ids: (N, L) integer ids of all eval chunks; word_ids: (N, L), needed only for whole-word masking.
    masking: `MaskingCollator`'s fields (mask_token_id, vocab_size, special_token_ids, whole_word, probabilities).
    Draws from `torch.Generator().manual_seed(seed)`: the global torch RNG is neither read nor advanced. Slice the
    returned tensors into eval batches of any size: the masks do not depend on it.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise MLMError(f"seed must be an integer, got {seed!r}.")
    return MaskingCollator(**masking).mask(torch.as_tensor(input_ids), word_ids,
                                           generator=torch.Generator().manual_seed(int(seed)))
