"""mlm/lean_ops.py: the memory-saving autograd functions give the plain ops' values and gradients, and the model
really keeps fewer activations with them."""

import pytest
import torch
import torch.nn.functional as F

from mlm.lean_ops import activation_then_linear, attention_with_dropout
from mlm.model import DistilBertConfig, DistilBertForMaskedLM


def leaves(*shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


def gradients(output, inputs, seed=1):
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    return torch.autograd.grad(output, inputs, upstream)


# ------------------------------------------------------------------------ activation_then_linear


@pytest.mark.parametrize("name, activation", [("gelu", F.gelu), ("relu", F.relu)])
def test_activation_then_linear_matches_plain_autograd(name, activation):
    hidden, weight, bias = leaves((2, 5, 12), (7, 12), (7,))
    plain = F.linear(activation(hidden), weight, bias)
    lean = activation_then_linear(hidden, weight, bias, name)
    # Same kernels in the same order: the forward is bit-identical, the gradients too (same mm shapes).
    assert torch.equal(lean, plain)
    for got, want in zip(gradients(lean, [hidden, weight, bias]), gradients(plain, [hidden, weight, bias])):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_activation_then_linear_gradcheck_float64():
    inputs = leaves((3, 4, 6), (5, 6), (5,), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, w, b: activation_then_linear(h, w, b, "gelu"), inputs)


def test_activation_then_linear_under_cpu_autocast_returns_fp32_parameter_gradients():
    hidden, weight, bias = leaves((2, 3, 8), (4, 8), (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = hidden.to(torch.bfloat16)  # what an autocast lin1 hands over
        lean = activation_then_linear(low, weight, bias, "gelu")
        plain = F.linear(F.gelu(low), weight, bias)
    assert lean.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(lean, plain)
    lean_grads = gradients(lean, [hidden, weight, bias])
    plain_grads = gradients(plain, [hidden, weight, bias])
    for got, want in zip(lean_grads, plain_grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 has 8 bits of mantissa


# ------------------------------------------------------------------------ attention_with_dropout


def plain_attention(q, k, v, key_mask, keep, dropout_p, scale):
    scores = q @ k.transpose(-1, -2) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return (torch.softmax(scores, -1) * keep / (1 - dropout_p)) @ v


def test_attention_with_dropout_matches_the_plain_formula_with_the_same_mask():
    q, k, v = leaves((2, 3, 6, 4), (2, 3, 6, 4), (2, 3, 6, 4))
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]
    torch.manual_seed(123)
    lean = attention_with_dropout(q, k, v, key_mask, 0.25, 0.5)
    torch.manual_seed(123)  # the mask is one torch.rand draw of the probabilities' shape from the default generator
    keep = torch.rand(2, 3, 6, 6) >= 0.25
    assert 0 < keep.sum() < keep.numel()
    plain = plain_attention(q, k, v, key_mask, keep, 0.25, 0.5)
    torch.testing.assert_close(lean, plain, rtol=1e-6, atol=1e-6)
    for got, want in zip(gradients(lean, [q, k, v]), gradients(plain, [q, k, v])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_attention_with_dropout_gradcheck_float64_with_padding():
    q, k, v = leaves((1, 2, 5, 3), (1, 2, 5, 3), (1, 2, 5, 3), dtype=torch.float64)
    key_mask = torch.tensor([[True, True, True, False, False]])[:, None, None, :]

    def seeded(q, k, v):  # gradcheck calls it many times: the same seed gives the same dropout mask each time
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return attention_with_dropout(q, k, v, key_mask, 0.3, 0.7)

    assert torch.autograd.gradcheck(seeded, (q, k, v))


def test_attention_with_dropout_keeps_the_expected_fraction_and_scale():
    ones = torch.ones(4, 4, 64, 8)
    torch.manual_seed(0)
    out = attention_with_dropout(ones, ones, ones, None, 0.1, 1.0)  # uniform probabilities; v = 1
    # Each output is (kept fraction of 64 keys) / 0.9: its mean over many rows is 1 within sampling error.
    assert abs(out.mean().item() - 1.0) < 0.01
    assert 0.85 < out.min().item() and out.max().item() < 1.15


# ------------------------------------------------------------------------ in the model


def saved_float_tensors(model, input_ids, labels):
    shapes = []

    def pack(tensor):
        if tensor.is_floating_point() and not isinstance(tensor, torch.nn.Parameter):
            shapes.append((tuple(tensor.shape), tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids, None, labels).loss.backward()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    unique = {pointer: (shape, size) for shape, pointer, size in shapes if pointer not in parameters}
    return list(unique.values())


def test_training_model_saves_no_attention_probabilities_and_one_ffn_activation():
    config = DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=16)
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(config).train()
    batch, length = 3, 16
    input_ids = torch.randint(5, 64, (batch, length))
    labels = torch.where(torch.rand(batch, length) < 0.3, input_ids, -100)
    saved = saved_float_tensors(model, input_ids, labels)
    # No float (..., L, L) tensor: attention probabilities are recomputed, only a bool keep-mask is kept.
    assert not [shape for shape, _ in saved if shape[-2:] == (length, length)]
    # One F-wide tensor per layer (lin1's output), not two (gelu's input and output): (B, L, F) in the first
    # blocks, (N, F) in the last, which computes its feed-forward at the N labelled positions only.
    hidden_sized = sorted((s for s, _ in saved if s and s[-1] == config.hidden_dim), key=len, reverse=True)
    labelled = int((labels != -100).sum())
    width = config.hidden_dim
    assert hidden_sized == [(batch, length, width)] * (config.n_layers - 1) + [(labelled, width)]
