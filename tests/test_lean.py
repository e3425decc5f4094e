"""mlm/speed/lean.py: the lean model equals the plain one (forward, loss, gradients, dropout draws) and keeps less
for backward."""

import copy

import pytest
import torch

from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.speed.lean import LeanAttention, LeanFeedForward, make_lean

# Both models run the same fp32 operations, except that the lean one fuses GELU into a custom backward and writes
# attention out (scores, then softmax) where SDPA scales q and k: rounding-level differences of a few fp32 ulp
# (~1e-7 relative) per operation, which two layers and the head keep far below 1e-5 on values of order 1. Gradients
# sum over many more terms, hence a looser absolute bound.
VALUES = dict(rtol=1e-5, atol=1e-6)
GRADS = dict(rtol=1e-4, atol=1e-6)
# The families' differences in the model (mlm/model.py): token types, RoBERTa's positions, BERT's attention output
# dropout, which the lean attention must keep drawing after its own.
FAMILIES = {"distilbert": {}, "bert": dict(family="bert", type_vocab_size=2),
            "roberta": dict(family="roberta", type_vocab_size=1, pad_token_id=1, max_position_embeddings=18)}


def tiny_config(**overrides) -> DistilBertConfig:
    values = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=16)
    return DistilBertConfig(**{**values, **overrides})


def plain_and_lean(family="distilbert", **overrides):
    torch.manual_seed(0)
    plain = DistilBertForMaskedLM(tiny_config(**FAMILIES[family], **overrides))
    return plain, make_lean(copy.deepcopy(plain))


def batch(seed=1, rows=3, length=16):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 64, (rows, length), generator=generator)
    labels = torch.where(torch.rand(rows, length, generator=generator) < 0.3, input_ids, -100)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[1, 11:] = 0
    return input_ids, attention_mask, labels.masked_fill(attention_mask == 0, -100)


@pytest.mark.parametrize("family", FAMILIES)
def test_make_lean_keeps_the_parameters_and_their_names(family):
    plain, lean = plain_and_lean(family)
    blocks = lean.distilbert.transformer.layer
    assert all(type(b.attention) is LeanAttention and type(b.ffn) is LeanFeedForward for b in blocks)
    assert list(lean.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(lean.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert lean.vocab_projector.weight is lean.distilbert.embeddings.word_embeddings.weight  # still tied
    before = [type(m) for m in lean.modules()]
    assert make_lean(lean) is lean and [type(m) for m in lean.modules()] == before  # twice changes nothing


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_lean_forward_values_equal_the_plain_model(padded, family):
    plain, lean = plain_and_lean(family)
    plain.eval(), lean.eval()
    input_ids, attention_mask, labels = batch()
    mask = attention_mask if padded else None
    torch.testing.assert_close(lean(input_ids, mask).logits, plain(input_ids, mask).logits, **VALUES)
    lean_out, plain_out = lean(input_ids, mask, labels), plain(input_ids, mask, labels)
    torch.testing.assert_close(lean_out.logits, plain_out.logits, **VALUES)
    torch.testing.assert_close(lean_out.loss, plain_out.loss, **VALUES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lean_loss_and_gradients_equal_the_plain_model_with_dropout_zero(checkpointing, family):
    plain, lean = plain_and_lean(family, dropout=0.0, attention_dropout=0.0)
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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_lean_model_with_dropout_draws_the_plain_models_masks(padded, family):
    """With dropout on, the same seed gives the lean model the plain model's dropout masks, attention included (its
    CPU kernel draws as SDPA's math path does), hence the same loss and gradients up to rounding. A lean model that
    drew its masks otherwise would land ~0.1 away on this loss (checked below by reseeding)."""
    p = 0.3
    plain, lean = plain_and_lean(family, dropout=p, attention_dropout=p)
    with torch.no_grad():  # weights of std 0.3 instead of 0.02: attention far from uniform, logits far from flat,
        for model in (plain, lean):  # so every dropout site moves the output
            torch.manual_seed(0)
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0, 0.3)
    input_ids, attention_mask, labels = batch()
    mask = attention_mask if padded else None
    losses, grads = [], []
    for model in (plain, lean, lean):
        torch.manual_seed(7 if len(losses) < 2 else 8)  # the third pass: other draws, for scale
        model.train().zero_grad()
        loss = model(input_ids, mask, labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], **VALUES)
    # fp32 rounding scales with the terms summed: bounded relative to the largest gradient.
    scale = max(grad.abs().max().item() for grad in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert abs(losses[2] - losses[0]) > 100 * (1e-6 + 1e-5 * losses[0])  # other masks move the loss far


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
    # blocks, (N, F) in the last, which computes its feed-forward at the N labelled positions only (mlm/model.py).
    hidden_sized = sorted((s for s, _ in saved if s and s[-1] == width), key=len, reverse=True)
    labelled = int((labels != -100).sum())
    assert hidden_sized == [(*input_ids.shape, width)] * (plain.config.n_layers - 1) + [(labelled, width)]
    # The plain model keeps what autograd keeps: the probabilities, and two F-wide tensors per layer.
    plain_saved = saved_float_tensors(plain.train(), input_ids, labels)
    assert [shape for shape, _ in plain_saved if shape[-2:] == (length, length)]
    assert sum(size for _, size in saved) < 0.6 * sum(size for _, size in plain_saved)
