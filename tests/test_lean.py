"""mlm/speed/lean.py: the lean model equals the plain one (forward, loss, gradients) and keeps less for backward."""

import copy

import pytest
import torch

from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.speed.lean import LeanEncoder, is_lean, make_lean

# Both models run the same fp32 operations, except that the lean one computes some matmuls over fewer rows (the
# last block at the labelled rows), fuses GELU into a custom backward and takes the loss through log_softmax +
# gather: rounding-level differences of a few fp32 ulp (~1e-7 relative) per operation, which two layers and the
# head keep far below 1e-5 on values of order 1. Gradients sum over many more terms, hence a looser absolute bound.
VALUES = dict(rtol=1e-5, atol=1e-6)
GRADS = dict(rtol=1e-4, atol=1e-6)


def tiny_config(**overrides) -> DistilBertConfig:
    values = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=16)
    return DistilBertConfig(**{**values, **overrides})


def plain_and_lean(**overrides):
    torch.manual_seed(0)
    plain = DistilBertForMaskedLM(tiny_config(**overrides))
    return plain, make_lean(copy.deepcopy(plain))


def batch(seed=1, rows=3, length=16):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 64, (rows, length), generator=generator)
    labels = torch.where(torch.rand(rows, length, generator=generator) < 0.3, input_ids, -100)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[1, 11:] = 0
    return input_ids, attention_mask, labels.masked_fill(attention_mask == 0, -100)


def test_make_lean_keeps_the_parameters_and_their_names():
    plain, lean = plain_and_lean()
    assert is_lean(lean) and not is_lean(plain)
    assert list(lean.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(lean.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert lean.vocab_projector.weight is lean.distilbert.embeddings.word_embeddings.weight  # still tied
    assert make_lean(lean) is lean and isinstance(lean.distilbert, LeanEncoder)  # applying twice changes nothing


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_lean_forward_values_equal_the_plain_model(padded):
    plain, lean = plain_and_lean()
    plain.eval(), lean.eval()
    input_ids, attention_mask, labels = batch()
    mask = attention_mask if padded else None
    torch.testing.assert_close(lean(input_ids, mask).logits, plain(input_ids, mask).logits, **VALUES)
    lean_out, plain_out = lean(input_ids, mask, labels), plain(input_ids, mask, labels)
    torch.testing.assert_close(lean_out.logits, plain_out.logits, **VALUES)
    torch.testing.assert_close(lean_out.loss, plain_out.loss, **VALUES)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lean_loss_and_gradients_equal_the_plain_model_with_dropout_zero(checkpointing):
    plain, lean = plain_and_lean(dropout=0.0, attention_dropout=0.0)
    input_ids, attention_mask, labels = batch()
    losses, grads = [], []
    for model in (plain, lean):
        model.train()
        model.distilbert.gradient_checkpointing = checkpointing
        loss = model(input_ids, attention_mask, labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], **VALUES)
    for name, grad in grads[0].items():
        assert torch.count_nonzero(grad) > 0, name  # every parameter takes part, so every comparison means something
        torch.testing.assert_close(grads[1][name], grad, **GRADS, msg=name)


class InjectedDropout(torch.nn.Module):
    """Inverted dropout with a given (B, L, D) keep-mask; on (N, D) input, the mask at the flat positions `rows`
    (the lean last block computes its feed-forward at the labelled positions only)."""

    def __init__(self, keep: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.keep, self.rows, self.calls = keep, rows, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        keep = self.keep.reshape(-1, self.keep.shape[-1]).index_select(0, self.rows) if x.dim() == 2 else self.keep
        return x * keep


def test_lean_model_with_dropout_equals_the_plain_one_given_the_same_masks(monkeypatch):
    # Lean and plain draw their attention dropout from different random numbers (one torch.rand of the
    # probabilities' shape, against SDPA's own), so with dropout on their losses can only agree in distribution,
    # and the dropout-induced spread at these rates (~0.01 on a loss of ~4) is far wider than any bug worth
    # catching. So we give both models the SAME masks: every hidden dropout (embeddings, each feed-forward) is
    # replaced by a fixed mask, and each attention layer drops the same (B, H, L, L) entries (lean: its
    # dropout_mask draw; plain: SDPA, replaced by the reference formula softmax(qk^T/sqrt(dh)) * keep @ v). The
    # two models then compute the same function, and must agree to the fp32 rounding of the dropout-free test.
    p = 0.3
    torch.manual_seed(0)
    plain = DistilBertForMaskedLM(tiny_config(dropout=p, attention_dropout=p))
    with torch.no_grad():  # weights of std 0.3 instead of 0.02: attention far from uniform, logits far from flat,
        for param in plain.parameters():  # so every dropout site moves the output (checked at the end)
            if param.dim() == 2:
                param.normal_(0, 0.3)
    lean = make_lean(copy.deepcopy(plain))
    input_ids, attention_mask, labels = batch()
    rows, (batch_size, length), config = (labels.flatten() != -100).nonzero().squeeze(1), input_ids.shape, plain.config
    generator = torch.Generator().manual_seed(11)

    def keep_mask(*shape):
        return (torch.rand(shape, generator=generator) >= p) / (1 - p)

    hidden = [keep_mask(batch_size, length, config.dim) for _ in range(1 + config.n_layers)]
    attention = [torch.rand(batch_size, config.n_heads, length, length, generator=generator) < p
                 for _ in range(config.n_layers)]
    used = {"lean": 0, "plain": 0}

    def lean_dropout_mask(shape, dropout_p, device):
        assert tuple(shape) == attention[0].shape and dropout_p == p
        used["lean"] += 1
        return attention[used["lean"] - 1], 1 / (1 - p)

    def plain_sdpa(q, k, v, attn_mask=None, dropout_p=0.0):
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        if dropout_p > 0:
            assert dropout_p == p
            used["plain"] += 1
            probabilities = probabilities * ~attention[used["plain"] - 1] / (1 - p)
        return probabilities @ v

    monkeypatch.setattr("mlm.speed.lean_ops.dropout_mask", lean_dropout_mask)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", plain_sdpa)

    losses, logits, grads = [], [], []
    for model in (plain, lean):
        dropouts = [InjectedDropout(hidden[0], rows)]
        model.distilbert.embeddings.dropout = dropouts[0]
        for block, keep in zip(model.distilbert.transformer.layer, hidden[1:], strict=True):
            block.ffn.dropout = InjectedDropout(keep, rows)
            dropouts.append(block.ffn.dropout)
        model.train()
        out = model(input_ids, attention_mask, labels)
        out.loss.backward()
        losses.append(out.loss.detach())
        logits.append(out.logits.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
        assert [d.calls for d in dropouts] == [1] * len(dropouts)  # every dropout site took its injected mask
    assert used == {"lean": config.n_layers, "plain": config.n_layers}

    # fp32 rounding scales with the magnitude of the terms summed, not of the result: with these larger weights a
    # logit near 0 comes out of terms of order max|logit|, so its absolute error is bounded relative to that scale.
    # The same for gradients, at the scale of the largest one: k_lin.bias's gradient is 0 in exact arithmetic
    # (softmax ignores a constant added to every score of a row), so both models hold rounding noise there.
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6 * logits[0].abs().max().item())
    torch.testing.assert_close(losses[1], losses[0], **VALUES)
    grad_scale = max(grad.abs().max().item() for grad in grads[0].values())
    for name, grad in grads[0].items():
        assert torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5 * grad_scale, msg=name)
    # The masks mattered: without them the loss is far outside the tolerance the two losses met.
    with torch.no_grad():
        dropout_free = plain.eval()(input_ids, attention_mask, labels)
    assert abs(dropout_free.loss - losses[0]) > 1e3 * (1e-6 + 1e-5 * losses[0])


def test_lean_model_in_training_mode_gives_loss_zero_without_labels():
    _, lean = plain_and_lean()
    lean.train()
    input_ids, _, _ = batch()
    assert lean(input_ids, labels=torch.full_like(input_ids, -100)).loss.item() == 0.0


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


def test_lean_training_saves_no_attention_probabilities_and_one_ffn_activation():
    plain, lean = plain_and_lean()
    input_ids, _, labels = batch()
    length, width = input_ids.shape[1], plain.config.hidden_dim
    saved = saved_float_tensors(lean.train(), input_ids, labels)
    # No float (..., L, L) tensor: attention probabilities are recomputed, only a bool keep-mask is kept.
    assert not [shape for shape, _ in saved if shape[-2:] == (length, length)]
    # One F-wide tensor per layer (lin1's output), not two (gelu's input and output): (B, L, F) in the first
    # blocks, (N, F) in the last, which computes its feed-forward at the N labelled positions only.
    hidden_sized = sorted((s for s, _ in saved if s and s[-1] == width), key=len, reverse=True)
    labelled = int((labels != -100).sum())
    assert hidden_sized == [(*input_ids.shape, width)] * (plain.config.n_layers - 1) + [(labelled, width)]
    # The plain model keeps what autograd keeps: the probabilities, and two F-wide tensors per layer.
    plain_saved = saved_float_tensors(plain.train(), input_ids, labels)
    assert [shape for shape, _ in plain_saved if shape[-2:] == (length, length)]
    assert sum(size for _, size in saved) < 0.6 * sum(size for _, size in plain_saved)
