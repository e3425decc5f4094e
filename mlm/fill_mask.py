"""Fill-mask inference: the model's top-k tokens for every [MASK] in a sentence, like the reference pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlm.errors import MLMError
from mlm.masking_inputs import stack_rows
from mlm.model import DistilBertForMaskedLM
from mlm.tokenizer import Tokenizer


@dataclass
class Prediction:
    token_id: int
    # The token as text, as the reference pipeline's token_str ("film", "##s", RoBERTa's " film"); written as a Python
    # literal ('\n') where it holds a control character, which would break a printed line or a table row.
    token: str
    score: float  # softmax probability over the whole vocabulary
    sequence: str  # the sentence with this [MASK] filled in (other [MASK]s left as they are)


def check_prompts(tokenizer: Tokenizer, sentences: list[str], *, top_k: int, max_length: int) -> list:
    """The sentences' encodings, once each is known to hold a [MASK] and fit the model (and top_k >= 1). [MASK]
    stands for the tokenizer's own mask token (RoBERTa's <mask>), so that one prompt serves every family."""
    if top_k < 1:
        raise MLMError(f"`top_k` must be at least 1, got {top_k}.")
    encodings = tokenizer.backend.encode_batch([text.replace("[MASK]", tokenizer.mask_token) for text in sentences])
    for sentence, encoding in zip(sentences, encodings):
        if tokenizer.mask_token_id not in encoding.ids:
            own = f" (or the tokenizer's {tokenizer.mask_token})" if tokenizer.mask_token != "[MASK]" else ""
            raise MLMError(f"No [MASK] in {sentence!r}: write the word to predict as [MASK]{own}, e.g. 'This is a "
                           "great [MASK].'")
        if len(encoding.ids) > max_length:
            raise MLMError(f"{sentence[:40]!r}… is {len(encoding.ids)} tokens long; the model takes at most "
                           f"{max_length}.")
    return encodings


@torch.no_grad()
def fill_mask(model: DistilBertForMaskedLM, tokenizer: Tokenizer, sentences: list[str],
              top_k: int = 5) -> list[list[list[Prediction]]]:
    """For each sentence, for each [MASK] in it (left to right), the top_k predictions, best first."""
    encodings = check_prompts(tokenizer, sentences, top_k=top_k, max_length=model.config.max_length)
    device = next(model.parameters()).device
    # Right padding, as the reference tokenizer pads; the attention mask keeps padding out of every row.
    input_ids, _, attention_mask = stack_rows([e.ids for e in encodings], None, pad_token_id=tokenizer.pad_token_id)

    was_training = model.training
    model.eval()
    try:
        mask = attention_mask.to(device) if attention_mask is not None else None  # None: no row is padded
        logits = model(input_ids.to(device), mask).logits.float()  # (B, L, V)
    finally:
        model.train(was_training)
    probabilities = logits.softmax(dim=-1)
    # Only ids that are tokens: a checkpoint's vocabulary may be padded past its tokenizer's (to a multiple of 8).
    tokens = torch.tensor(sorted(i for i in tokenizer.backend.get_vocab().values() if i < logits.shape[-1]),
                          device=logits.device)
    top_scores, top = probabilities[..., tokens].topk(min(top_k, len(tokens)), dim=-1)  # (B, L, k)
    top_ids = tokens[top]

    results, decode = [], tokenizer.backend.decode
    for row, encoding in enumerate(encodings):
        ids, per_mask = encoding.ids, []
        for at in (i for i, token in enumerate(ids) if token == tokenizer.mask_token_id):
            per_mask.append([Prediction(token_id, _printable(decode([token_id], skip_special_tokens=False)), score,
                                        _decode(tokenizer, ids[:at] + [token_id] + ids[at + 1:]))
                             for score, token_id in zip(top_scores[row, at].tolist(), top_ids[row, at].tolist())])
        results.append(per_mask)
    return results


def _decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    # Drop [CLS]/[SEP]/[PAD] but keep any other [MASK]s visible, so a multi-mask sentence still reads right.
    hidden = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    return tokenizer.backend.decode([i for i in ids if i not in hidden], skip_special_tokens=False)


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)
