"""The masking API's inputs: argument checks with one-line errors, and rows stacked into (B, L) batches.

mlm/masking.py reads as the algorithm; what it takes from callers (any integer array, lists of rows of
different lengths, probabilities from a config file) is checked and shaped here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from mlm.errors import MLMError


def check_probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise MLMError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)


def check_replace_probs(mask_replace_prob: float, random_replace_prob: float) -> tuple[float, float]:
    mask_replace_prob = check_probability("mask_replace_prob", mask_replace_prob)
    random_replace_prob = check_probability("random_replace_prob", random_replace_prob)
    # Same test as the reference's __post_init__ (a plain float sum, so 0.9 + 0.1 passes).
    if mask_replace_prob + random_replace_prob > 1:
        raise MLMError(f"mask_replace_prob + random_replace_prob must not exceed 1 (got {mask_replace_prob} + "
                       f"{random_replace_prob}); the rest of the selected tokens are left unchanged.")
    return mask_replace_prob, random_replace_prob


def as_ids(name: str, ids) -> torch.Tensor:
    """A (B, L) int64 copy of `ids`; the copy is what lets us write [MASK] without touching the caller's data."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 2:
        raise MLMError(f"{name} must be a 2-D (batch, length) array, got shape {tuple(ids.shape)}.")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise MLMError(f"{name} must hold integers, got dtype {ids.dtype}.")
    return ids.to(torch.int64, copy=True)


def check_same_shape(ids: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if other.shape != ids.shape:
        raise MLMError(f"{name} has shape {tuple(other.shape)} but input_ids has {tuple(ids.shape)}; they must match.")


def check_vocab(mask_token_id: int, vocab_size: int) -> None:
    if int(vocab_size) < 1:
        raise MLMError(f"vocab_size must be positive, got {vocab_size}.")
    if not 0 <= int(mask_token_id) < int(vocab_size):
        raise MLMError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size}).")


def row_field(row, key: str, position: int) -> np.ndarray:
    """A row's `key` ("input_ids" or "word_ids"): rows are dicts, or tuples (input_ids, word_ids)."""
    try:
        value = row[key] if isinstance(row, Mapping) else row[position]
    except (KeyError, IndexError, TypeError):
        raise MLMError(f"MaskingCollator rows must be dicts with {key!r} or tuples (input_ids, word_ids); got "
                       f"{type(row).__name__}" + (" (whole-word masking needs word_ids)" if key == "word_ids" else "")
                       ) from None
    return np.asarray(value)


def stack_rows(ids: list, words: list | None, *, pad_token_id: int):
    """(input_ids, word_ids or None, attention_mask or None), each (B, L) int64: rows right-padded to the longest
    (pad id, word id -1); an attention mask only where some row is padded (full-length chunks, the main workflow,
    need none)."""
    lengths = [len(row) for row in ids]
    if words is not None and [len(row) for row in words] != lengths:
        raise MLMError("Each row's word_ids must have the same length as its input_ids.")

    def padded(rows: list, value: int) -> torch.Tensor:
        if min(lengths) == max(lengths):  # the main workflow, every training batch: one copy via np.stack
            return torch.from_numpy(np.stack(rows).astype(np.int64))
        out = np.full((len(rows), max(lengths)), value, dtype=np.int64)
        for row, values in zip(out, rows):
            row[: len(values)] = values
        return torch.from_numpy(out)

    mask = None if min(lengths) == max(lengths) else padded([np.ones(n) for n in lengths], 0)
    return padded(ids, pad_token_id), padded(words, -1) if words is not None else None, mask
