"""Check that a model saved by mlm loads unchanged in transformers (developer-only, needs the reference extra).

Saves a random mlm model (a local --config, default the full distilbert-base-uncased shape) with its tokenizer,
loads the folder with AutoModelForMaskedLM and pipeline("fill-mask"), and compares logits and predictions.

    python scripts/reference/check_transformers_compat.py --model-dir path/to/distilbert-base-uncased
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForMaskedLM, pipeline

from mlm.files.pretrained import load_config, save_pretrained
from mlm.fill_mask import fill_mask
from mlm.model import DistilBertForMaskedLM
from mlm.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="folder with config.json and the tokenizer files")
    parser.add_argument("--sentence", default="This is a great [MASK].")
    args = parser.parse_args()

    torch.manual_seed(0)
    ours = DistilBertForMaskedLM(load_config(args.model_dir)).eval()
    tokenizer = load_tokenizer(args.model_dir)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(ours, folder, tokenizer=tokenizer)
        theirs = AutoModelForMaskedLM.from_pretrained(folder).eval()
        ids = torch.tensor([tokenizer.backend.encode(args.sentence).ids])
        with torch.no_grad():
            difference = (theirs(input_ids=ids).logits - ours(ids).logits).abs().max().item()
        print(f"AutoModelForMaskedLM loaded the mlm folder; max |logit difference| = {difference:.3g}")
        assert difference < 1e-4, difference
        theirs_top = [p["token"] for p in pipeline("fill-mask", model=folder, top_k=5)(args.sentence)]
        ours_top = [p.token_id for p in fill_mask(ours, tokenizer, [args.sentence], top_k=5)[0][0]]
        print(f"pipeline('fill-mask') top-5 ids {theirs_top}, mlm's {ours_top}")
        assert theirs_top == ours_top
    print("OK: transformers reads mlm's saved model and tokenizer unchanged")


if __name__ == "__main__":
    main()
