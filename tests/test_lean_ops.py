"""mlm/lean_ops.py: the memory-saving autograd functions give the plain ops' values and gradients, and the model
really keeps fewer activations with them."""

import pytest
import torch
import torch.nn.functional as F

from mlm.lean_ops import activation_then_linear, attention_with_dropout, dropout, dropout_mask
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


def plain_attention(q, k, v, key_mask, drop, keep_scale, scale):
    scores = q @ k.transpose(-1, -2) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return (torch.softmax(scores, -1) * ~drop * keep_scale) @ v


def test_attention_with_dropout_matches_the_plain_formula_with_the_same_mask():
    q, k, v = leaves((2, 3, 6, 4), (2, 3, 6, 4), (2, 3, 6, 4))
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]
    torch.manual_seed(123)
    lean = attention_with_dropout(q, k, v, key_mask, 0.25, 0.5)
    torch.manual_seed(123)  # the mask is one dropout_mask draw of the probabilities' shape
    drop, keep_scale = dropout_mask((2, 3, 6, 6), 0.25, torch.device("cpu"))
    assert 0 < drop.sum() < drop.numel() and keep_scale == 4 / 3
    plain = plain_attention(q, k, v, key_mask, drop, keep_scale, 0.5)
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
    out = attention_with_dropout(ones, ones, ones, None, 0.1, 1.0)  # uniform probabilities 1/64; v = 1
    # Each output is (kept keys of 64) / 64 * keep_scale: an integer count once the scale is taken out.
    keep_scale = 2**16 / (2**16 - 6554)
    kept = out[..., 0] * 64 / keep_scale
    torch.testing.assert_close(kept, kept.round(), rtol=0, atol=1e-4)
    # 1024 rows of 64 Bernoulli(1 - p') draws: the kept fraction is 1 - p' within 5 standard deviations.
    rate = 1 - 6554 / 2**16
    assert abs(kept.mean().item() / 64 - rate) < 5 * (rate * (1 - rate) / kept.numel() / 64) ** 0.5


# ------------------------------------------------------------------------ dropout_mask, dropout


@pytest.mark.parametrize("p, dropped_levels", [(0.1, 6554), (0.25, 16384), (0.5, 32768), (1e-6, 0), (0.0, 0)])
def test_dropout_mask_rate_is_p_rounded_to_a_multiple_of_2_to_the_minus_16(p, dropped_levels):
    torch.manual_seed(0)
    drop, keep_scale = dropout_mask((1000, 1000), p, torch.device("cpu"))
    assert drop.dtype == torch.bool and drop.shape == (1000, 1000)
    rate = dropped_levels / 2**16
    assert keep_scale == 1 / (1 - rate)  # exact: both are 2^16 / (2^16 - levels) in float64
    # A binomial count: 5 standard deviations of 10^6 draws (the test cannot flake in practice).
    assert abs(drop.float().mean().item() - rate) <= 5 * (rate * (1 - rate) / 1e6) ** 0.5


def test_dropout_mask_uses_the_default_generator_and_independent_16_bit_slices():
    torch.manual_seed(7)
    first, _ = dropout_mask((4, 1001), 0.5, torch.device("cpu"))  # odd size: the last 64-bit draw is cut
    torch.manual_seed(7)
    again, _ = dropout_mask((4, 1001), 0.5, torch.device("cpu"))
    assert torch.equal(first, again)
    # With p = 1/2 the mask is the sign bit of each 16-bit slice: neighbours (slices of one draw) must agree
    # half the time, as independent bits do, and the four slice positions must each drop half the time.
    torch.manual_seed(1)
    drop, _ = dropout_mask((250_000, 4), 0.5, torch.device("cpu"))
    tolerance = 5 * (0.25 / 250_000) ** 0.5
    for column in range(4):
        assert abs(drop[:, column].float().mean().item() - 0.5) < tolerance
    for column in range(3):
        agree = (drop[:, column] == drop[:, column + 1]).float().mean().item()
        assert abs(agree - 0.5) < tolerance


def test_dropout_mask_with_p_one_drops_everything():
    drop, keep_scale = dropout_mask((3, 5), 1.0, torch.device("cpu"))
    assert drop.all() and keep_scale == 0.0


def test_dropout_values_gradient_and_what_it_saves():
    x = torch.randn(8, 16, 32, requires_grad=True)
    torch.manual_seed(3)
    out = dropout(x, 0.1, training=True)
    torch.manual_seed(3)
    drop, keep_scale = dropout_mask(x.shape, 0.1, x.device)
    assert torch.equal(out, torch.where(drop, 0.0, x * keep_scale))
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(grad, torch.where(drop, 0.0, torch.full_like(x, keep_scale)))

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropout(x, 0.1, training=True)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]  # F.dropout keeps a float tensor here


def test_dropout_is_the_identity_in_eval_or_at_p_zero():
    x = torch.randn(4, 5)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x


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
