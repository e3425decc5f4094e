"""Autograd functions that keep fewer activations for backward than plain PyTorch ops would.

Training memory is dominated by what autograd saves between forward and backward. Two places save more than
the backward pass needs, and each can instead recompute something cheap:

- The feed-forward `lin2(gelu(h))`: autograd keeps both h (for gelu's derivative) and gelu(h) (for lin2's weight
  gradient), two (B, L, 4D) tensors. `activation_then_linear` keeps h only and recomputes gelu(h) in backward,
  one elementwise pass next to two large matmuls. Saves 4·D floats per token per layer.
- Attention with dropout on the CPU: PyTorch's fused CPU attention kernel has no dropout, so SDPA falls back to
  its "math" path, which keeps the (B, H, L, L) probabilities several times over (softmax output, dropped copy,
  a reshaped copy for the matmul). `attention_with_dropout` keeps q, k, v and a 1-byte dropout mask and
  recomputes the probabilities in backward: the flash-attention idea, without the tiling. GPUs do not need it:
  their SDPA kernels (flash, memory-efficient) support dropout and already recompute.

The dropout mask is drawn as the math path draws it, so both drop the same positions; the forward values equal the
plain ops' and the gradients plain autograd's up to fp32 rounding (tests/test_lean_ops.py). mlm/speed/lean.py puts
these functions into the model's modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> (activation, its backward: (grad_output, input) -> grad_input). The derivatives are the very kernels
# autograd runs for F.gelu (exact erf form) and F.relu, written out because torch.compile cannot trace a
# torch.autograd.grad call inside a backward.
_ACTIVATIONS = {
    "gelu": (F.gelu, lambda grad, x: torch.ops.aten.gelu_backward(grad, x)),
    "relu": (F.relu, lambda grad, x: grad.masked_fill(x <= 0, 0.0)),
}


class _ActivationThenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_activation, weight, bias, activation):
        ctx.activation = activation
        ctx.save_for_backward(pre_activation, weight)
        # Under autocast the input arrives in the low-precision dtype; compute in it, as autocast's linear would.
        activated = _ACTIVATIONS[activation][0](pre_activation)
        return F.linear(activated, weight.to(pre_activation.dtype), bias.to(pre_activation.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        pre_activation, weight = ctx.saved_tensors
        function, derivative = _ACTIVATIONS[ctx.activation]
        dtype = pre_activation.dtype
        activated = function(pre_activation)  # recomputed: one elementwise pass
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1]).to(dtype)  # (N, D)
        grad_weight = grad_rows.t().mm(activated.reshape(-1, activated.shape[-1]))  # (D, F)
        del activated  # free it before the next (..., F) tensor: backward's peak memory is what counts here
        grad_bias = grad_rows.sum(0)
        grad_activated = grad_output.to(dtype).matmul(weight.to(dtype))  # (..., F)
        grad_pre = derivative(grad_activated, pre_activation)
        return grad_pre, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


def activation_then_linear(pre_activation: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           activation: str) -> torch.Tensor:
    """F.linear(act(pre_activation), weight, bias), keeping only pre_activation for backward.

    pre_activation (..., F); weight (D, F); bias (D,); activation "gelu" (exact erf form) or "relu"
    -> (..., D) in pre_activation's dtype.
    """
    return _ActivationThenLinear.apply(pre_activation, weight, bias, activation)


def dropout_mask(probabilities: torch.Tensor, p: float) -> torch.Tensor:
    """(same shape) bool, True = dropped: each element with probability p, drawn from the default generator of the
    tensor's device exactly as F.dropout and SDPA's math path draw (bernoulli(1 - p) over a tensor of this shape
    and dtype), so a run draws the same masks with or without the lean modules. p < 1 (the config checks it)."""
    return torch.empty_like(probabilities).bernoulli_(1 - p) == 0


def _probabilities(q, k, key_mask, scale) -> torch.Tensor:  # (B, H, L, dh) x2 -> (B, H, L, L), fp32 or wider
    # The softmax runs in fp32 at least, also when autocast hands over bf16/fp16 q and k.
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


class _AttentionWithDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, dropout_p, scale):
        probabilities = _probabilities(q, k, key_mask, scale)
        drop, keep_scale = dropout_mask(probabilities, dropout_p), 1 / (1 - dropout_p)  # (B, H, L, L) bool
        # Inverted dropout (kept values scaled by 1/(1-p), so expectations are unchanged), in place.
        dropped = probabilities.masked_fill_(drop, 0.0).mul_(keep_scale)
        ctx.keep_scale, ctx.scale = keep_scale, scale
        ctx.save_for_backward(q, k, v, drop, key_mask)
        return torch.matmul(dropped.to(v.dtype), v)

    @staticmethod
    def backward(ctx, grad_output):  # (B, H, L, dh)
        q, k, v, drop, key_mask = ctx.saved_tensors
        dtype = q.dtype  # the matmuls run in the inputs' dtype (low precision under autocast), the softmax in fp32
        grad_output = grad_output.to(dtype)
        probabilities = _probabilities(q, k, key_mask, ctx.scale)  # recomputed: one small matmul + softmax
        dropped = probabilities.masked_fill(drop, 0.0).mul_(ctx.keep_scale)
        grad_v = torch.matmul(dropped.to(dtype).transpose(-1, -2), grad_output)
        del dropped  # (B, H, L, L) temporaries are made one at a time, in place where possible
        grad_probabilities = torch.matmul(grad_output, v.transpose(-1, -2)).to(probabilities.dtype)
        grad_probabilities.masked_fill_(drop, 0.0).mul_(ctx.keep_scale)
        # Softmax backward: p * (g - sum(g * p)) along the key axis.
        row_dot = (grad_probabilities * probabilities).sum(-1, keepdim=True)
        grad_scores = grad_probabilities.sub_(row_dot).mul_(probabilities).mul_(ctx.scale).to(dtype)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None, None


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                           dropout_p: float, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) with dropout, times v; saves q, k, v and a bool dropout mask for backward.

    q, k, v (B, H, L, dh) float; key_mask (B, 1, 1, L) bool, True = attend, or None -> (B, H, L, dh).
    The dropout mask is one `dropout_mask` draw of shape (B, H, L, L), from the default generator of q's device.
    """
    return _AttentionWithDropout.apply(q, k, v, key_mask, dropout_p, scale)
