"""Regenerate the model golden fixtures from the reference implementation (Hugging Face transformers).

Developer-only: needs `pip install -e ".[reference]"`. Neither the library nor the test suite imports
transformers; they only read what this script writes:

  tests/fixtures/tiny-distilbert/{config.json,model.safetensors}   a random tiny model saved by transformers
  tests/fixtures/model_golden.safetensors                          inputs, logits and losses it produced
  tests/fixtures/tiny-{bert,roberta}/, {bert,roberta}_golden.safetensors   the same for BERT and RoBERTa

    python scripts/reference/make_model_fixtures.py [--family bert roberta]
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

try:
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DistilBertConfig,
        DistilBertForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )
except ImportError as err:  # pragma: no cover - developer script
    raise SystemExit(f"This script needs transformers: pip install -e '.[reference]' ({err})") from None

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
# Tiny but complete: 2 layers, head size 8 (not a power of two, so the attention scale is not exact in binary).
TINY = dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
TINY_BERT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64)
# RoBERTa as roberta-base has it: positions from pad_token_id + 1 = 2 (so 2 more rows), one token type, eps 1e-5.
TINY_ROBERTA = TINY_BERT | dict(max_position_embeddings=66, type_vocab_size=1, layer_norm_eps=1e-5)
# family -> (model, its config, golden file, pad id, stand-ins for the start and end tokens)
FAMILIES = {
    "distilbert": (DistilBertForMaskedLM, DistilBertConfig(**TINY), "model_golden.safetensors", 0, (1, 2)),
    "bert": (BertForMaskedLM, BertConfig(**TINY_BERT), "bert_golden.safetensors", 0, (1, 2)),
    "roberta": (RobertaForMaskedLM, RobertaConfig(**TINY_ROBERTA), "roberta_golden.safetensors", 1, (0, 2)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixture folder (default: tests/fixtures)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the random weights and inputs")
    parser.add_argument("--family", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    args = parser.parse_args()
    for family in args.family:
        make(family, args.out, args.seed)


def make(family: str, out: Path, seed: int) -> None:
    model_class, config, golden_file, pad, (start, end) = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(out / f"tiny-{family}")

    batch, length = 4, 24
    input_ids = torch.randint(5, config.vocab_size, (batch, length))
    input_ids[:, 0], input_ids[:, -1] = start, end  # stand-ins for [CLS]/[SEP], <s>/</s>
    if family != "distilbert":  # the padding id inside an unpadded row (a random replacement may draw it): RoBERTa
        input_ids[2, 10] = pad  # gives it position pad_token_id and numbers the tokens after it one lower
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 17:] = 0  # right padding, as the reference tokenizer pads
    attention_mask[3, 6:] = 0
    padded_ids = input_ids.masked_fill(attention_mask == 0, pad)
    labels = torch.full((batch, length), -100)
    chosen = torch.rand(batch, length) < 0.3
    labels[chosen] = input_ids[chosen]

    tensors = {"input_ids": input_ids, "padded_input_ids": padded_ids, "attention_mask": attention_mask,
               "labels": labels}
    with torch.no_grad():
        for name, ids, mask in (("unpadded", input_ids, None), ("padded", padded_ids, attention_mask)):
            output = model(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(ids == pad, -100))
            tensors[f"logits_{name}"] = output.logits.contiguous()
            tensors[f"loss_{name}"] = output.loss.reshape(1)
        if family != "distilbert":  # dropout on: mlm, seeded alike, must draw the same masks at the same places
            torch.manual_seed(seed + 1)
            tensors["logits_train"] = model.train()(input_ids=input_ids).logits.contiguous()
    save_file(tensors, out / golden_file,
              metadata={"generator": f"transformers {model_class.__name__}, sdpa, fp32, eval", "seed": str(seed)})
    print(f"wrote {out / f'tiny-{family}'} and {out / golden_file}")


if __name__ == "__main__":
    main()
