"""Perplexity on a frozen, already masked eval set.

Two averages of the per-token cross-entropy are reported (docs/reference.md#eval-loss):

- `loss`: token-weighted, the mean over every masked token of the eval set. perplexity = exp(loss). It does not
  depend on the eval batch size, which is why it is our headline figure.
- `reference_loss`: what the reference Trainer reports, the mean of per-batch token means weighted by the
  number of sequences in each batch. It changes with the batch size and gives a slightly different figure; it is
  here so that numbers can be compared with the course's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

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


@torch.no_grad()
def evaluate(
    model: DistilBertForMaskedLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    forward: Callable[..., object] | None = None,
    positions: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Score the eval set `input_ids` (N, L) int64 with `labels` (N, L) int64 (-100 where unmasked).

    Under DDP each process scores its shard and passes `all_reduce` (a sum over processes), so every process
    returns the whole set's figures. The speed path (mlm/speed/compiled.py eval_path) passes `forward` (the model
    compiled or graphed) and `positions` (a batch's (M,) bool labelled mask -> flat positions, padded).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Accumulate on the device and read back once at the end: no host synchronisation per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    reference_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    tokens = reference_sequences = 0
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    try:
        for start in range(0, len(input_ids), batch_size):
            batch_labels = labels[start : start + batch_size]
            # Positions and targets are picked on the host, where labels live, so the GPU never reports a count.
            labelled = batch_labels.reshape(-1) != IGNORE_INDEX
            targets = batch_labels.reshape(-1)[labelled]  # (N,)
            if targets.numel() == 0:
                continue  # the reference drops such batches' NaN losses; they hold no tokens to score
            flat = labelled.nonzero().squeeze(1) if positions is None else positions(labelled)  # (N [+ padding],)
            with autocast:
                out = (model if forward is None else forward)(
                    input_ids[start : start + batch_size].to(device), labels=batch_labels.to(device),
                    label_positions=flat.to(device))
            loss_sum += out.loss.double() * targets.numel()
            reference_sum += out.loss.double() * len(batch_labels)
            correct += (out.logits[: targets.numel()].argmax(dim=-1) == targets.to(device)).sum()
            tokens += targets.numel()
            reference_sequences += len(batch_labels)
    finally:
        model.train(was_training)
    totals = torch.stack([loss_sum, reference_sum, correct.double(),
                          torch.tensor(float(tokens), dtype=torch.float64, device=device),
                          torch.tensor(float(reference_sequences), dtype=torch.float64, device=device)])
    if all_reduce is not None:
        totals = all_reduce(totals)
    loss_sum, reference_sum, correct, tokens, reference_sequences = totals.tolist()
    tokens, reference_sequences = int(tokens), int(reference_sequences)
    loss = loss_sum / max(tokens, 1)
    reference_loss = reference_sum / max(reference_sequences, 1)
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss),
        reference_loss=reference_loss,
        reference_perplexity=math.exp(reference_loss),
        accuracy=correct / max(tokens, 1),
        tokens=tokens,
        sequences=reference_sequences,
    )
