"""Predict the [MASK] tokens of sentences with a DistilBERT, BERT or RoBERTa MLM, like transformers' fill-mask
pipeline. [MASK] stands for the tokenizer's own mask token (RoBERTa's <mask>, which works as well).

    mlm-fill-mask --model distilbert-base-uncased "This is a great [MASK]."
    mlm-fill-mask --model runs/imdb "This is a great [MASK]." "I [MASK] this [MASK]." --top-k 3
    mlm-fill-mask --model runs/imdb --json "This is a great [MASK]."

--model takes a Hub repo id or a local folder with config.json, model.safetensors and tokenizer.json
(the folder mlm-train writes).
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from mlm.cli.args import ArgumentParser, run_command
from mlm.errors import MLMError
from mlm.files.hub import set_progress_bars
from mlm.files.pretrained import check_tokenizer_fits, load_pretrained
from mlm.fill_mask import fill_mask
from mlm.run.folder import unfinished_run
from mlm.run.processes import pick_device
from mlm.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("sentences", nargs="+",
                        help="sentences containing at least one [MASK] (or the tokenizer's own mask token)")
    parser.add_argument("--model", default="distilbert-base-uncased",
                        help="Hub repo id or local model folder (default: %(default)s)")
    parser.add_argument("--tokenizer", default=None,
                        help="Hub repo id or folder of the tokenizer, if not stored with the model")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (repo ids only)")
    parser.add_argument("--top-k", type=int, default=5, help="predictions per [MASK] (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N "
                        "(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per sentence) instead of text")
    parser.add_argument("--no-progress", dest="progress_bar", action="store_false", help="no Hub download bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_progress_bars(args.progress_bar)
    device = pick_device(args.device)  # checked before the model loads
    if why := unfinished_run(Path(args.model).expanduser()):
        raise MLMError(why)
    model = load_pretrained(args.model, revision=args.revision).to(device)
    tokenizer = load_tokenizer(args.tokenizer or args.model, revision=None if args.tokenizer else args.revision)
    check_tokenizer_fits(model, tokenizer.vocab_size, args.model)
    results = fill_mask(model, tokenizer, args.sentences, top_k=args.top_k)

    for sentence, per_mask in zip(args.sentences, results):
        if args.json:
            print(json.dumps({"sentence": sentence, "masks": [[asdict(p) for p in masks] for masks in per_mask]}))
            continue
        print(sentence)
        for index, predictions in enumerate(per_mask):
            if len(per_mask) > 1:
                print(f"  [MASK] #{index + 1}")
            for p in predictions:
                print(f"  {p.score:8.4f}  {p.token:<15} {p.sequence}")
        print()


def run() -> None:
    """The `mlm-fill-mask` console script."""
    run_command(main)


if __name__ == "__main__":
    run()
