"""Speed and memory techniques for training, layered on the plain model: `make_lean(model)` swaps modules.

mlm/model.py is the architecture in stock PyTorch ops. `make_lean` replaces some of its modules, in place, by
versions that compute the same values but keep less for backward or skip work whose result is never read. The
parameters (and so the weight names, the optimizer and the checkpoints) stay exactly those of the plain model;
tests/test_lean.py checks that both give the same forward values, loss and gradients.

Each technique and what it saves (docs/performance.md, "Lean training", has the measured figures):

- the feed-forward keeps lin1's output only and recomputes GELU in backward: one (B, L, 4D) tensor per layer;
- CPU attention with dropout keeps a 1-byte mask instead of the (B, H, L, L) probabilities (several float
  copies), recomputing them in backward;
- the cross-entropy's gradient is made in its saved (N, V) buffer: two (N, V) fp32 tensors at backward's start;
- given labels, the last block's output projection and feed-forward run at the labelled rows only, as the head
  does: the work of the unlabelled rows there is skipped.

Where they pay off: `train()` applies them on the CPU (`TrainConfig.lean = "auto"`, `--lean`). On a GPU the
plain model runs SDPA's flash and memory-efficient kernels, which recompute attention in backward themselves,
and F.cross_entropy; `--lean on` applies the techniques there too, to measure them (the CPU attention kernel
then steps aside for SDPA). The glibc malloc settings, the other CPU technique, live in mlm/speed/host_memory.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlm.model import (
    DistilBertForMaskedLM,
    DistilBertModel,
    FeedForward,
    MultiHeadSelfAttention,
    TransformerBlock,
    key_mask_from,
)
from mlm.speed import lean_ops


def make_lean(model: DistilBertForMaskedLM) -> DistilBertForMaskedLM:
    """Swap the lean modules into `model` (in place, any device) and return it; a lean model is left as it is."""
    if isinstance(model.distilbert, LeanEncoder):
        return model
    encoder = model.distilbert
    for index, block in enumerate(encoder.transformer.layer):
        encoder.transformer.layer[index] = LeanBlock(block)
    model.distilbert = LeanEncoder(encoder)
    model.loss_sum = LeanCrossEntropySum()
    return model


def is_lean(model: nn.Module) -> bool:
    return isinstance(getattr(model, "distilbert", None), LeanEncoder)


class LeanAttention(nn.Module):
    """MultiHeadSelfAttention (same linear layers) with the CPU dropout kernel and an optional row selection."""

    def __init__(self, plain: MultiHeadSelfAttention):
        super().__init__()
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = plain.q_lin, plain.k_lin, plain.v_lin, plain.out_lin
        self.n_heads, self.dropout_p = plain.n_heads, plain.dropout_p

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); key_mask (B, 1, 1, L) bool or None -> (B, L, D).

        rows (N,) int64, optional: flat positions (b * L + l) whose output is wanted; then -> (N, D). Every
        position still serves as key and value; only the output projection is skipped elsewhere.
        """
        batch, length, dim = x.shape
        head_dim = dim // self.n_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, dh)
            return t.view(batch, length, self.n_heads, head_dim).transpose(1, 2)

        q, k, v = split_heads(self.q_lin(x)), split_heads(self.k_lin(x)), split_heads(self.v_lin(x))
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0 and x.device.type == "cpu" and torch.is_grad_enabled():
            # PyTorch's CPU attention kernel has no dropout, so SDPA would fall back to a path that keeps the
            # (B, H, L, L) probabilities three times over for backward.
            context = lean_ops.attention_with_dropout(q, k, v, key_mask, dropout_p, head_dim**-0.5)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(batch * length, dim)  # (B·L, D)
        context = context.index_select(0, rows) if rows is not None else context.view(batch, length, dim)
        return self.out_lin(context)


class LeanFeedForward(nn.Module):
    """FeedForward (same linear layers) keeping only lin1's output for backward: lean_ops.activation_then_linear."""

    def __init__(self, plain: FeedForward):
        super().__init__()
        self.lin1, self.lin2, self.activation, self.dropout = plain.lin1, plain.lin2, plain.activation, plain.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        hidden = self.lin1(x)  # (..., F)
        return self.dropout(lean_ops.activation_then_linear(hidden, self.lin2.weight, self.lin2.bias, self.activation))


class LeanBlock(nn.Module):
    """TransformerBlock with lean attention and feed-forward, which can compute its output at some rows only."""

    def __init__(self, plain: TransformerBlock):
        super().__init__()
        self.attention = LeanAttention(plain.attention)
        self.sa_layer_norm = plain.sa_layer_norm
        self.ffn = LeanFeedForward(plain.ffn)
        self.output_layer_norm = plain.output_layer_norm

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D), or (N, D) at the flat positions `rows` only (see LeanAttention)."""
        attended = self.attention(x, key_mask, rows)
        if rows is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, rows)  # the residual at the same positions
        x = self.sa_layer_norm(attended + x)
        return self.output_layer_norm(self.ffn(x) + x)


class LeanEncoder(nn.Module):
    """DistilBertModel (same embeddings and blocks) whose last block runs at the wanted positions only.

    With ~15% of positions labelled this skips ~10% of the model's FLOPs. The earlier blocks need every
    position, as keys and values of the next; each returned row is the same computation as before.
    """

    def __init__(self, plain: DistilBertModel):
        super().__init__()
        self.embeddings, self.transformer = plain.embeddings, plain.transformer
        self.gradient_checkpointing = plain.gradient_checkpointing

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As DistilBertModel.forward: (B, L) ids -> (B, L, D), or (N, D) at `output_positions`."""
        key_mask = key_mask_from(attention_mask)
        x = self.embeddings(input_ids)
        last = len(self.transformer.layer) - 1
        for index, block in enumerate(self.transformer.layer):
            rows = output_positions if index == last else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, key_mask, rows, use_reentrant=False)
            else:
                x = block(x, key_mask, rows)
        return x


class LeanCrossEntropySum(nn.Module):
    """nn.CrossEntropyLoss(reduction="sum") for all-valid targets, its gradient made in its saved buffer."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (N, V), (N,) -> ()
        return lean_ops.cross_entropy_sum(logits, targets)
