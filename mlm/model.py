"""One encoder for masked language modelling, in plain PyTorch: DistilBERT, BERT and RoBERTa checkpoints.

The three are one architecture. The module and weight names here are DistilBERT's (the course's model);
mlm/files/families.py maps them to each family's own config keys and tensor names, so checkpoints move both ways
(docs/reference.md#model-weights, docs/base-models.md):

    embeddings:  LayerNorm(word + [token type 0] + learned position) -> dropout
    N blocks:    h = LN(attention(x) + x);  x = LN(dropout(lin2(gelu(lin1(h)))) + h)     (post-LayerNorm)
    MLM head:    logits = vocab_projector(LN(gelu(vocab_transform(x))))

with exact (erf) GELU, no final LayerNorm and a vocabulary projector whose weight IS the word-embedding matrix (one
Parameter) but which has its own bias. The families differ in a few config fields:

- DistilBERT (6 blocks): no token types, LayerNorm eps 1e-12, no dropout on the attention output.
- BERT (12 blocks): token-type embeddings (MLM uses type 0 only), `layer_norm_eps`, dropout on the attention output.
- RoBERTa: BERT whose positions count from pad_token_id + 1, skipping padding (so 514 position rows hold 512
  tokens), and whose head applies gelu whatever `hidden_act` says.

One deliberate difference: given labels, the last block past its attention, and the head, run only at the labelled
positions. Most tokens are unlabelled, and nothing reads the last block's output elsewhere: its feed-forward, its
attention's output projection and the (tokens x D) @ (D x V) vocabulary projection, the largest matmul in the model,
are skipped there, and (B, L, V) logits are never materialised. The loss is the same.

Every layer here is a stock PyTorch op. Reading, checking and writing config.json and the weights live in
mlm/files/pretrained.py; mlm/speed/ wraps this model from outside (lean modules swapped in, compiled, host-side
positions) without changing what it computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlm.constants import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "DistilBertConfig", "DistilBertForMaskedLM", "MLMOutput"]


@dataclass
class DistilBertConfig:
    """The network's config.json values, in DistilBERT's key names (defaults: distilbert-base-uncased); values
    checked on reading. mlm/files/families.py maps BERT's and RoBERTa's keys (hidden_size, ...) to these."""

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    max_position_embeddings: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    pad_token_id: int = 0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    family: str = "distilbert"  # the checkpoint layout: "distilbert", "bert" or "roberta"
    type_vocab_size: int = 0  # token-type rows (BERT, RoBERTa); 0: none
    layer_norm_eps: float = 1e-12  # the reference's value for DistilBERT and BERT; RoBERTa's configs say 1e-5
    # Keys we do not use (qa_dropout, seq_classif_dropout, ...) are kept so that a save writes them back.
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers token positions from pad_token_id + 1 (pad_token_id is padding's position); others from 0."""
        return self.pad_token_id + 1 if self.family == "roberta" else 0

    @property
    def max_length(self) -> int:
        """The longest sequence the position embeddings hold."""
        return self.max_position_embeddings - self.position_offset


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}  # F.gelu is the exact erf form, as in the reference


class Embeddings(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.pad_token_id, self.position_offset = config.pad_token_id, config.position_offset
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim,
                                                padding_idx=config.pad_token_id if self.position_offset else None)
        types = config.type_vocab_size
        self.token_type_embeddings = nn.Embedding(types, config.dim) if types else None
        self.LayerNorm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)  # capitalised: the reference's name
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) int64 -> (B, L, D)
        x = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]  # every token is of type 0 in MLM
        return self.dropout(self.LayerNorm(x + self.position_embeddings(self.positions(input_ids))))

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) int64 -> (L,) or (B, L) int64
        if not self.position_offset:  # 0..L-1 for every row, padded or not, as the reference numbers them
            return torch.arange(input_ids.shape[1], device=input_ids.device)
        # RoBERTa counts the tokens that are not pad_token_id from pad_token_id + 1; pad_token_id itself is at
        # position pad_token_id, wherever it stands. The reference reads this from the ids, not the attention mask.
        tokens = input_ids != self.pad_token_id
        return tokens.cumsum(1) * tokens + self.pad_token_id


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout_p = config.attention_dropout
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        # BERT and RoBERTa drop out the output projection too; DistilBERT drops the attention probabilities only.
        self.dropout = nn.Identity() if config.family == "distilbert" else nn.Dropout(config.dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, dh)
        batch, length, dim = x.shape
        return x.view(batch, length, self.n_heads, dim // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); key_mask (B, 1, 1, L) bool, True = attend, or None when nothing is padded -> (B, L, D); with
        rows (N,) int64, flat positions b * L + l, the output at those positions only: (N, D)."""
        q, k, v = self.split_heads(self.q_lin(x)), self.split_heads(self.k_lin(x)), self.split_heads(self.v_lin(x))
        context = self.attend(q, k, v, key_mask).transpose(1, 2).reshape(-1, x.shape[-1])  # (B * L, D), heads joined
        if rows is not None:
            context = context.index_select(0, rows)  # (N, D): every key and value took part, only these queries go on
        out = self.dropout(self.out_lin(context))
        return out if rows is not None else out.view(x.shape)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q kᵀ / √dh) v, each query over the keys key_mask lets through, with dropout on the probabilities
        while training (as the reference drops them): q, k, v (B, H, L, dh) -> (B, H, L, dh).

        F.scaled_dot_product_attention computes exactly that formula in one fused kernel; with no mask it may pick
        the flash kernel on a GPU.
        """
        dropout_p = self.dropout_p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)


class FeedForward(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.activation = config.activation
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return self.dropout(self.lin2(ACTIVATIONS[self.activation](self.lin1(x))))


class TransformerBlock(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); with rows (N,) int64, flat positions, only those positions: (N, D)."""
        attended = self.attention(x, key_mask, rows)
        if rows is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, rows)  # the residual at the same positions
        # Post-LN: the residual sum is normalised (BERT style), not the sublayer input.
        x = self.sa_layer_norm(attended + x)
        return self.output_layer_norm(self.ffn(x) + x)


class Transformer(nn.Module):
    """Only a container, so the weight names read `distilbert.transformer.layer.{i}.…` as in the reference."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))


def key_mask_from(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) 1 = token, 0 = padding -> (B, 1, 1, L) bool for every query row, or None when nothing is padded.

    An all-ones mask is dropped, as the reference does: the same result, and SDPA keeps its fastest kernels. The
    check reads one value back from the GPU, so the training loop passes None for its unpadded batches.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


class DistilBertModel(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)
        # Off by default. On: each block keeps only its input for backward and reruns its forward there, so
        # activations shrink to one (B, L, D) tensor per layer plus one block's worth, for ~1 extra forward pass.
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int64, attention_mask (B, L) 1 = token, 0 = padding -> hidden states (B, L, D); with
        output_positions (N,) int64, flat positions b * L + l, only those rows, which the last block alone
        computes: (N, D)."""
        key_mask = key_mask_from(attention_mask)
        x = self.embeddings(input_ids)
        last = len(self.transformer.layer) - 1
        for index, block in enumerate(self.transformer.layer):
            rows = output_positions if index == last else None  # earlier blocks: every position is a key of the next
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # The RNG state is stashed and restored, so the rerun draws the same dropout masks.
                x = checkpoint(block, x, key_mask, rows, use_reentrant=False)
            else:
                x = block(x, key_mask, rows)
        return x


class MLMOutput(NamedTuple):
    loss: torch.Tensor | None  # () float32, mean cross-entropy over labelled tokens; None without labels
    logits: torch.Tensor  # (B, L, V) without labels; with labels (N, V), the order of labels[labels != -100]


class DistilBertForMaskedLM(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the projector use the embedding matrix itself, so optimizer, decay and clipping see it once."""
        if self.config.tie_word_embeddings:
            self.vocab_projector.weight = self.distilbert.embeddings.word_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference's random init: N(0, initializer_range) weights, zero biases, zero padding row, LN 1/0."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V)
        activation = ACTIVATIONS["gelu" if self.config.family == "roberta" else self.config.activation]
        return self.vocab_projector(self.vocab_layer_norm(activation(self.vocab_transform(hidden))))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> MLMOutput:
        """input_ids (B, L) int64; attention_mask (B, L) 1/0 or None; labels (B, L) int64, -100 = no loss.

        Without labels the logits are (B, L, V). With labels only the labelled positions are computed past the
        last block's attention (`loss_at`): the logits are (N, V) for the N positions where labels != -100, in
        row-major order, and the loss is the mean cross-entropy over them, exactly as projecting everything and
        ignoring -100 would give.
        """
        if labels is None:
            return MLMOutput(loss=None, logits=self.head(self.distilbert(input_ids, attention_mask)))  # (B, L, V)
        positions = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) flat positions b * L + l
        return self.loss_at(positions, input_ids, attention_mask, labels)

    def loss_at(self, positions: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                labels: torch.Tensor) -> MLMOutput:
        """The MLM loss and the logits (N, V) at `positions` (N,) int64, flat positions b * L + l.

        The loss is the sum of the cross-entropies of the labelled positions over their count (at least 1): the
        mean, and 0 instead of the reference's NaN for a batch without labels. A position whose label is -100 adds
        nothing to it (F.cross_entropy ignores -100), so `positions` may hold unlabelled ones too.
        """
        logits = self.head(self.distilbert(input_ids, attention_mask, output_positions=positions))  # (N, V)
        targets = labels.reshape(-1).index_select(0, positions)  # (N,)
        labelled = (targets != IGNORE_INDEX).sum().clamp(min=1)  # on the device: no wait for the GPU
        # In fp32 also under autocast, where the logits arrive in bf16/fp16.
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / labelled
        return MLMOutput(loss=loss, logits=logits)

    def num_parameters(self) -> int:
        """Parameter count (all of them, as transformers' default), the tied matrix counted once (parameters()
        deduplicates it)."""
        return sum(p.numel() for p in self.parameters())
