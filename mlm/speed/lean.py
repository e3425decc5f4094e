"""Less memory for backward, layered on the plain model: `make_lean(model)` turns some of its modules into lean ones.

mlm/model.py is the architecture in stock PyTorch ops. `make_lean` changes the class of its attention and
feed-forward modules, in place, to the subclasses below, which call mlm/speed/lean_ops.py's functions: they keep
less for backward and recompute the rest. Nothing else changes: the parameters (so the weight names, the optimizer
and the checkpoints), the dropout draws and the values computed, up to fp32 rounding (tests/test_lean.py compares
them with the plain model's).

Where they pay off: `train()` applies them on the CPU (`--lean auto`). On a GPU the plain model runs SDPA's flash
and memory-efficient kernels, which recompute attention in backward themselves, so `--lean on` there changes only
the feed-forward. Figures: docs/performance.md, "Lean training".
"""

from __future__ import annotations

import torch
from torch import nn

from mlm.model import FeedForward, MultiHeadSelfAttention
from mlm.speed import lean_ops


def make_lean(model: nn.Module) -> nn.Module:
    """Turn `model`'s attention and feed-forward modules into the lean ones below (in place, any device); return it."""
    for module in model.modules():
        if type(module) is MultiHeadSelfAttention:
            module.__class__ = LeanAttention
        elif type(module) is FeedForward:
            module.__class__ = LeanFeedForward
    return model


class LeanAttention(MultiHeadSelfAttention):
    """MultiHeadSelfAttention whose CPU training with dropout recomputes the probabilities in backward."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        if self.training and self.dropout_p > 0 and q.device.type == "cpu" and torch.is_grad_enabled():
            return lean_ops.attention_with_dropout(q, k, v, key_mask, self.dropout_p, q.shape[-1] ** -0.5)
        return super().attend(q, k, v, key_mask)


class LeanFeedForward(FeedForward):
    """FeedForward keeping only lin1's output for backward (lean_ops.activation_then_linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        hidden = self.lin1(x)  # (..., F)
        return self.dropout(lean_ops.activation_then_linear(hidden, self.lin2.weight, self.lin2.bias, self.activation))
