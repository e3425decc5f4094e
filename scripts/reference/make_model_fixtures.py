"""Regenerate the model golden fixtures from the reference implementation (Hugging Face transformers).

Developer-only: needs `pip install -e ".[reference]"`. Neither the library nor the test suite imports
transformers; they only read what this script writes:

  tests/fixtures/tiny-distilbert/{config.json,model.safetensors}   a random tiny model saved by transformers
  tests/fixtures/model_golden.safetensors                          inputs, logits and losses it produced

    python scripts/reference/make_model_fixtures.py
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DistilBertConfig, DistilBertForMaskedLM

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
# Tiny but complete: 2 layers, head size 8 (not a power of two, so the attention scale is not exact in binary).
TINY = dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixture folder (default: tests/fixtures)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the random weights and inputs")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = DistilBertForMaskedLM(DistilBertConfig(**TINY)).eval()
    model.save_pretrained(args.out / "tiny-distilbert")

    batch, length = 4, 24
    input_ids = torch.randint(5, TINY["vocab_size"], (batch, length))
    input_ids[:, 0], input_ids[:, -1] = 1, 2  # stand-ins for [CLS]/[SEP]
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 17:] = 0  # right padding, as the reference tokenizer pads
    attention_mask[3, 6:] = 0
    padded_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.full((batch, length), -100)
    chosen = torch.rand(batch, length) < 0.3
    labels[chosen] = input_ids[chosen]

    tensors = {"input_ids": input_ids, "padded_input_ids": padded_ids, "attention_mask": attention_mask,
               "labels": labels}
    with torch.no_grad():
        for name, ids, mask in (("unpadded", input_ids, None), ("padded", padded_ids, attention_mask)):
            out = model(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(ids == 0, -100))
            tensors[f"logits_{name}"] = out.logits.contiguous()
            tensors[f"loss_{name}"] = out.loss.reshape(1)
    save_file(tensors, args.out / "model_golden.safetensors",
              metadata={"generator": "transformers DistilBertForMaskedLM, sdpa, fp32, eval", "seed": str(args.seed)})
    print(f"wrote {args.out / 'tiny-distilbert'} and {args.out / 'model_golden.safetensors'}")


if __name__ == "__main__":
    main()
