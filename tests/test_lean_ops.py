"""mlm/speed/lean_ops.py: the memory-saving autograd functions give the plain ops' values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from mlm.speed.lean_ops import activation_then_linear, attention_with_dropout, dropout_mask


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
    drop, keep_scale = dropout_mask(torch.empty(2, 3, 6, 6), 0.25), 4 / 3
    assert 0 < drop.sum() < drop.numel()
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
    # Each output is (kept keys of 64) / 64 / (1 - p): an integer count once the scale is taken out.
    kept = out[..., 0] * 64 * 0.9
    torch.testing.assert_close(kept, kept.round(), rtol=0, atol=1e-4)
    # 1024 rows of 64 Bernoulli(0.9) draws: the kept fraction is 0.9 within 5 standard deviations.
    assert abs(kept.mean().item() / 64 - 0.9) < 5 * (0.9 * 0.1 / kept.numel() / 64) ** 0.5


# ------------------------------------------------------------------------ dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 1e-6, 0.0])
def test_dropout_mask_drops_with_probability_p(p):
    torch.manual_seed(0)
    drop = dropout_mask(torch.empty(1000, 1000), p)
    assert drop.dtype == torch.bool and drop.shape == (1000, 1000)
    # A binomial count: 5 standard deviations of 10^6 draws (the test cannot flake in practice).
    assert abs(drop.float().mean().item() - p) <= 5 * (p * (1 - p) / 1e6) ** 0.5


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_mask_draws_as_f_dropout_does(p):
    # Dropout must follow torch's global RNG as F.dropout (and SDPA's math path) do: set by torch.manual_seed,
    # saved and restored by gradient checkpointing and by a resumed run's RNG state, and the same positions
    # dropped as the plain model drops, leaving the generator where F.dropout leaves it.
    shape = (4, 3, 16, 16)
    torch.manual_seed(7)
    dropped_by_torch, after_torch = F.dropout(torch.ones(shape), p) == 0, torch.get_rng_state()
    torch.manual_seed(7)
    assert torch.equal(dropout_mask(torch.ones(shape), p), dropped_by_torch)
    assert torch.equal(torch.get_rng_state(), after_torch)
    assert not torch.equal(dropout_mask(torch.ones(shape), p), dropped_by_torch)  # the next call: a new mask


def test_attention_dropout_follows_the_global_seed():
    # The same property one level up, so a generator planted in attention_with_dropout itself is caught too.
    q, k, v = leaves((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4))
    with torch.no_grad():
        torch.manual_seed(3)
        first, second = (attention_with_dropout(q, k, v, None, 0.5, 0.5) for _ in range(2))
        torch.manual_seed(3)
        again = attention_with_dropout(q, k, v, None, 0.5, 0.5)
        torch.manual_seed(4)
        other = attention_with_dropout(q, k, v, None, 0.5, 0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, second) and not torch.equal(first, other)
