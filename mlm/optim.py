"""AdamW with the reference Trainer's weight-decay groups, the run's step counts, and its learning-rate schedule.

Reference (docs/reference.md#optimizer-schedule): decoupled weight decay on every weight matrix, the word
and position embeddings included (the tied projector is the same Parameter, so it appears once), and no decay on
biases or LayerNorm parameters. The learning rate decays linearly to 0 after an optional linear warmup (the
course's; `lr_scheduler` picks another of transformers' schedules), and it advances only on optimizer steps that
really happened (an fp16 step skipped for inf gradients does not count).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mlm.errors import MLMError


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: decayed (weights, embeddings) and not decayed (biases, LayerNorm parameters)."""
    no_decay_ids = {
        id(p) for module in model.modules() if isinstance(module, nn.LayerNorm) for p in module.parameters()
    }
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # yields the tied matrix once
        if not param.requires_grad:
            continue
        (no_decay if id(param) in no_decay_ids or name.endswith("bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8
) -> torch.optim.AdamW:
    device = next(model.parameters()).device
    # The fused kernel (the reference Trainer's default, "adamw_torch_fused") updates every parameter in one
    # pass, several times faster than the default foreach version on CPU too (docs/performance.md).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        weight_decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None
    )


@dataclass
class Schedule:
    global_batch: int  # chunks per optimizer step, over all micro-batches and processes
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, train_chunks: int, *, global_batch: int, epochs: int, max_steps: int | None,
           warmup_steps: float) -> Schedule:
        """The steps of a run: an epoch's last step may take a short batch (the reference keeps it); `max_steps`
        overrides `epochs`, as the reference's does (the run takes as many epochs as those steps need);
        `warmup_steps` is a count, or a fraction of all steps when below 1 (as the reference's warmup_ratio)."""
        steps_per_epoch = math.ceil(train_chunks / global_batch)
        total = epochs * steps_per_epoch if max_steps is None else max_steps
        warmup = math.ceil(warmup_steps * total) if warmup_steps < 1 else int(warmup_steps)  # rounded up, as theirs
        if warmup >= total:
            raise MLMError(f"`warmup_steps` {warmup_steps:g} gives {warmup} warmup steps, but the run has only "
                           f"{total}: the learning rate would never reach `lr`. Use fewer warmup steps (or a fraction "
                           "below 1).")
        return cls(global_batch, steps_per_epoch, total, warmup)


SCHEDULES = ("linear", "cosine", "constant", "constant-with-warmup")  # transformers' names, with dashes


def schedule_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str = "linear") -> float:
    """Learning-rate factor for the `step`-th optimizer step (0-based), as transformers' schedule of that name
    computes it (the arithmetic too, so the floats are equal).

    step < warmup: step / warmup (constant has no warmup). Then linear: (total - step) / (total - warmup), never
    below 0, so the first step after warmup uses the full learning rate and the last one lr / (total - warmup);
    cosine: half a cosine period from 1 towards 0 over the same steps; constant and constant-with-warmup: 1.
    """
    if step < warmup_steps and kind != "constant":
        return step / max(1, warmup_steps)
    if kind == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return 1.0


def lr_schedule(lr: float, *, warmup_steps: int, total_steps: int, kind: str = "linear") -> Callable[[int], float]:
    """step -> the learning rate of that optimizer step (0-based, counting the steps that ran): lr x schedule_factor,
    the factor the reference's LambdaLR applies."""
    return lambda step: lr * schedule_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
