"""Score any models on one frozen eval set: the base model, our runs and anyone's published fine-tune alike.

The eval set is built exactly as a training run builds it from the same data settings (same chunks, same held-out
draw, same seed), so mlm-evaluate (mlm/cli/evaluate.py) reproduces a run's own perplexities and ranks models on
identical masked tokens. Models must share a tokenizer: perplexities over different tokenizations are not comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mlm.corpus import load_train_eval_chunks
from mlm.errors import MLMError
from mlm.evaluate import EvalResult, evaluate
from mlm.files.pretrained import load_model
from mlm.fill_mask import Prediction, fill_mask
from mlm.masking import freeze_eval_masks
from mlm.tokenizer import Tokenizer, load_tokenizer


@dataclass
class EvalSet:
    input_ids: torch.Tensor  # (N, L) int64, masked
    labels: torch.Tensor  # (N, L) int64, -100 where not masked
    masking: str  # "token" or "wwm"
    masked_tokens: int


@dataclass
class ModelScore:
    model: str  # as the user named it: Hub id or folder
    result: EvalResult
    fill_mask: list[list[list[Prediction]]]  # per prompt, per [MASK], top-k best first


def build_eval_set(tokenizer: Tokenizer, *, dataset: str, seed: int = 42, masking: str = "token",
                   mlm_probability: float = 0.15, wwm_probability: float = 0.2, **data_args) -> EvalSet:
    """The held-out chunks a training run with these settings evaluates on, masked once with `seed`; `data_args`
    are `load_train_eval_chunks`' (train_splits, eval_split, validation_file, test_size, chunk_size, group_size,
    text_column, cache_dir, progress), with its defaults, which are a run's. No training draw is made: whatever
    the run's `train_size`, its eval chunks are drawn first, so they are these.

    masking "token" gives the run's own eval set (15% of tokens, 80/10/10); "wwm" masks whole words instead
    (`wwm_probability` of the words, all their tokens [MASK]), drawn the same frozen, seeded way.
    """
    if masking not in ("token", "wwm"):
        raise MLMError(f"`eval_masking` must be 'token' or 'wwm', got {masking!r}.")
    _, test = load_train_eval_chunks(dataset, tokenizer, seed=seed, train_size=None, **data_args)
    whole_word = masking == "wwm"
    masked = freeze_eval_masks(test.input_ids, test.word_ids if whole_word else None,
                               mask_token_id=tokenizer.mask_token_id, vocab_size=tokenizer.vocab_size,
                               special_token_ids=tokenizer.special_token_ids, seed=seed, whole_word=whole_word,
                               mlm_probability=mlm_probability, wwm_probability=wwm_probability)
    return EvalSet(masked["input_ids"], masked["labels"], masking, int((masked["labels"] != -100).sum()))


def check_same_tokenizer(tokenizers: Sequence[tuple[str, Tokenizer]]) -> None:
    """Refuse models whose tokenizers differ in vocabulary or special tokens, naming the first pair that does."""
    (first_name, first), *others = tokenizers
    vocab = first.backend.get_vocab(with_added_tokens=True)
    for name, tokenizer in others:
        other = tokenizer.backend.get_vocab(with_added_tokens=True)
        if other == vocab and tokenizer.special_token_ids == first.special_token_ids:
            continue
        differs = sorted(set(vocab.items()) ^ set(other.items()), key=lambda item: item[1])
        example = f", e.g. {differs[0][0]!r}" if differs else ""
        raise MLMError(f"{first_name} and {name} have different tokenizers ({len(vocab):,} and {len(other):,} "
                       f"tokens, {len(differs):,} entries differ{example}): perplexities over different "
                       "tokenizations are not comparable. Compare models that share a tokenizer.")


def compare_models(names: Sequence[str], *, tokenizer: str | None = None, prompts: Sequence[str] = (), top_k: int = 5,
                   batch_size: int = 64, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                   **eval_set_args) -> tuple[EvalSet, list[ModelScore]]:
    """Score every model in `names` (Hub ids or folders) on one eval set (`build_eval_set`'s keyword arguments), one
    model at a time, and predict `prompts`' [MASK]s with each.

    Tokenizers are loaded and compared first, so a mismatch is reported before any weights are read;
    `tokenizer` replaces every model's own (for model folders without one).
    """
    if not names:
        raise MLMError("No model to evaluate: pass --model NAME (a Hub id or a folder) at least once.")
    tokenizers = [(name, load_tokenizer(tokenizer or name)) for name in names]
    check_same_tokenizer(tokenizers)
    eval_set = build_eval_set(tokenizers[0][1], **eval_set_args)
    scores, length = [], eval_set.input_ids.shape[1]
    for name, model_tokenizer in tokenizers:
        model = load_model(name, tokenizer=model_tokenizer)
        if length > (limit := model.config.max_length):
            raise MLMError(f"{name} takes at most {limit} tokens, but the eval chunks have {length}: "
                           f"lower `chunk_size` to {limit} or less.")
        result = evaluate(model.to(device), eval_set.input_ids, eval_set.labels, batch_size=batch_size,
                          autocast_dtype=autocast_dtype)
        predictions = fill_mask(model, model_tokenizer, list(prompts), top_k=top_k) if prompts else []
        scores.append(ModelScore(name, result, predictions))
        del model  # one model in memory at a time
    return eval_set, scores
