"""Perplexity on a frozen, already masked eval set.

Two averages of the per-token cross-entropy are reported (docs/reference.md#eval-loss):

- `loss`: token-weighted, the mean over every masked token of the eval set. perplexity = exp(loss). It does not
  depend on the eval batch size, which is why it is our headline figure.
- `reference_loss`: what the reference Trainer reports, the mean of per-batch token means weighted by the
  number of sequences in each batch. It changes with the batch size and gives a slightly different figure; it is
  here so that numbers can be compared with the course's.

`evaluate` is `score_batches` then `summarize`: the figures of each eval batch, then their sums in batch order. Under
torchrun each process scores every world_size-th batch and the processes' rows are summed in the same order
(mlm/train.py evaluate_on), so a run's figures do not depend on how many processes scored them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from mlm.errors import MLMError
from mlm.model import IGNORE_INDEX, DistilBertForMaskedLM


@dataclass
class EvalResult:
    loss: float  # token-weighted mean cross-entropy
    perplexity: float  # exp(loss)
    reference_loss: float  # the reference Trainer's sequence-weighted mean of batch means
    reference_perplexity: float
    accuracy: float  # fraction of masked tokens whose top-1 prediction is the original token
    tokens: int  # masked tokens scored
    sequences: int


def evaluate(model: DistilBertForMaskedLM, input_ids: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 64,
             autocast_dtype: torch.dtype | None = None) -> EvalResult:
    """Score the eval set `input_ids` (N, L) int64 with `labels` (N, L) int64 (-100 where unmasked)."""
    return summarize(score_batches(model, input_ids, labels, batch_size=batch_size, autocast_dtype=autocast_dtype))


@torch.no_grad()
def score_batches(model: DistilBertForMaskedLM, input_ids: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                  autocast_dtype: torch.dtype | None = None, batches: Iterable[int] | None = None) -> torch.Tensor:
    """(n, 4) float64 on the CPU, one row per eval batch of `batch_size` rows (those numbered in `batches`, default
    all): its mean loss, masked tokens, sequences and correct top-1 predictions. A batch without masked tokens has
    loss 0 (the reference drops its NaN loss)."""
    device = next(model.parameters()).device
    batches = range(math.ceil(len(input_ids) / batch_size)) if batches is None else batches
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    figures, counts = [], []  # per batch: (loss, correct) on the device; (tokens, sequences) on the host
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            part = slice(batch * batch_size, (batch + 1) * batch_size)
            batch_labels = labels[part]
            # Targets are picked on the host, where the labels live, so the GPU never has to report a count.
            targets = batch_labels.reshape(-1)[batch_labels.reshape(-1) != IGNORE_INDEX]  # (N,)
            counts.append((len(targets), len(batch_labels)))
            if len(targets) == 0:
                figures.append(torch.zeros(2, dtype=torch.float64, device=device))
                continue
            with autocast:
                out = model(input_ids[part].to(device), labels=batch_labels.to(device))
            # Logits in label order; the compiled model (--cuda-graphs) pads the positions: keep the first N rows.
            correct = (out.logits[: len(targets)].argmax(dim=-1) == targets.to(device)).sum()
            figures.append(torch.stack([out.loss.double(), correct.double()]))  # read back once, at the end
    finally:
        model.train(was_training)
    if not figures:
        return torch.zeros((0, 4), dtype=torch.float64)
    loss, correct = torch.stack(figures).cpu().unbind(1)
    tokens, sequences = torch.tensor(counts, dtype=torch.float64).unbind(1)
    return torch.stack([loss, tokens, sequences, correct], dim=1)


def summarize(scores: torch.Tensor) -> EvalResult:
    """The eval figures from `score_batches`' rows (n, 4), summed in row order."""
    loss, tokens, sequences, correct = scores.unbind(1)
    total_tokens = int(tokens.sum())
    check_masked_tokens(total_tokens)
    scored = tokens > 0  # the reference drops batches without a masked token (their loss is NaN there)
    token_loss = float((loss * tokens).sum()) / total_tokens
    reference_loss = float((loss * sequences)[scored].sum()) / float(sequences[scored].sum())
    return EvalResult(loss=token_loss, perplexity=math.exp(token_loss), reference_loss=reference_loss,
                      reference_perplexity=math.exp(reference_loss), accuracy=float(correct.sum()) / total_tokens,
                      tokens=total_tokens, sequences=int(sequences[scored].sum()))


def check_masked_tokens(count: int) -> None:
    """Refuse an eval set without a masked token: it has no perplexity (exp of a mean over nothing)."""
    if count == 0:
        raise MLMError("The eval set has no masked token to score, so it has no perplexity: give it more chunks "
                       "(`test_size`) or a higher `mlm_probability`.")
