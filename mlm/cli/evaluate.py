"""Score models side by side on the same frozen eval set: perplexity, masked-token accuracy and fill-mask top-k.

Each --model is a Hub repo id or a local folder (config.json, model.safetensors, tokenizer.json), so the base
model, your runs and published fine-tunes compare alike. The data flags are mlm-train's: with the flags a
run was trained with, its own eval set is rebuilt and its perplexities are reproduced.

Examples:
  # the base model against a run of mlm-train (its default --output-dir)
  mlm-evaluate --model distilbert-base-uncased --model distilbert-base-uncased-finetuned-imdb
  # a published fine-tune (it needs a model.safetensors: mlm never loads pickled weights)
  mlm-evaluate --model huggingface-course/distilbert-base-uncased-finetuned-imdb
  mlm-evaluate --model runs/a --model runs/b --eval-masking wwm --json
"""

import argparse
import json
from dataclasses import asdict

import torch

from mlm.cli.compare import EvalSet, ModelScore, compare_models
from mlm.cli.train import add_data_source_flags
from mlm.data import size_flag
from mlm.errors import MLMError, run_cli
from mlm.files.hub import set_progress_bars
from mlm.settings import TrainConfig

DEFAULT_PROMPT = "This is a great [MASK]."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", dest="models", action="append", required=True,
                   help="Hub repo id or local model folder; repeat to compare several")
    p.add_argument("--tokenizer", default=None, help="tokenizer repo id or folder for every model, if not their own")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    g = p.add_argument_group("eval set (the same flags and defaults as mlm-train)")
    add_data_source_flags(g, TrainConfig())
    g.add_argument("--chunk-size", type=int, default=128, help="tokens per chunk (default: %(default)s)")
    g.add_argument("--group-size", type=int, default=None,
                   help="concatenate per group of this many texts (default: the whole split)")
    g.add_argument("--train-size", type=size_flag("--train-size"), default=10_000,
                   help="train chunks of the run, or 'all' (the eval draw depends on it) (default: %(default)s)")
    g.add_argument("--test-size", type=size_flag("--test-size"), default=1_000,
                   help="eval chunks, or a percentage such as 5%% (default: %(default)s)")
    g.add_argument("--cache-dir", default=None, help="where tokenized chunks are cached (default: $MLM_CACHE, "
                   "else $HF_HOME/mlm, else ~/.cache/mlm)")
    g.add_argument("--data-seed", "--seed", dest="seed", type=int, default=42,
                   help="seeds the eval draw and its masks: a run's --data-seed (--seed is accepted too, as before) "
                        "(default: %(default)s)")
    g.add_argument("--eval-masking", choices=["token", "wwm"], default="token",
                   help="token: 15%% of tokens, 80/10/10, the eval set of every training run; wwm: whole words, "
                        "all their tokens [MASK] (default: %(default)s)")
    g.add_argument("--mlm-probability", type=float, default=0.15,
                   help="share of tokens masked (token eval set) (default: %(default)s)")
    g.add_argument("--wwm-probability", type=float, default=0.2,
                   help="share of words masked (whole-word eval set) (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="(default: %(default)s)")

    g = p.add_argument_group("fill-mask and hardware")
    g.add_argument("--prompt", dest="prompts", action="append", default=None,
                   help=f"fill-mask prompt; repeatable (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--top-k", type=int, default=5, help="fill-mask predictions shown (default: %(default)s)")
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="auto: bf16 autocast on GPUs that support it, else fp16; fp32 on CPU (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--no-progress", dest="progress_bar", action="store_false", help="no progress bar")
    return p


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise MLMError("--device cuda was asked for, but torch sees no CUDA GPU. Use --device cpu.")
    return torch.device(choice)


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "auto":
        if device.type != "cuda":
            return None  # CPU autocast is slower than fp32 on most CPUs
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    set_progress_bars(args.progress_bar)
    for flag in ("chunk_size", "eval_batch_size", "top_k"):
        if getattr(args, flag) < 1:
            raise MLMError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}.")
    prompts = args.prompts or [DEFAULT_PROMPT]
    device = pick_device(args.device)
    eval_set, scores = compare_models(
        args.models, tokenizer=args.tokenizer, prompts=prompts, top_k=args.top_k, batch_size=args.eval_batch_size,
        device=device, autocast_dtype=autocast_dtype(args.precision, device), progress=args.progress_bar,
        dataset=args.dataset, text_column=args.text_column, train_splits=args.train_splits,
        eval_split=args.eval_split, validation_file=args.validation_file, chunk_size=args.chunk_size,
        group_size=args.group_size,
        train_size=args.train_size, test_size=args.test_size, cache_dir=args.cache_dir, seed=args.seed,
        masking=args.eval_masking, mlm_probability=args.mlm_probability, wwm_probability=args.wwm_probability)
    if args.json:
        print(json.dumps(as_json(args, eval_set, scores, prompts), indent=2))
    else:
        print(as_table(args, eval_set, scores, prompts))


def eval_source(args) -> str:
    """The split the eval chunks come from: held out of the training splits unless --eval-split/--validation-file."""
    if args.validation_file:
        return "train"  # a single file's one split
    return args.eval_split or "+".join(args.train_splits)


def as_json(args, eval_set: EvalSet, scores: list[ModelScore], prompts: list[str]) -> dict:
    return {
        "eval_set": {"dataset": args.validation_file or args.dataset, "split": eval_source(args),
                     "chunks": len(eval_set.input_ids),
                     "chunk_size": args.chunk_size, "masking": eval_set.masking,
                     "masked_tokens": eval_set.masked_tokens, "seed": args.seed},
        "models": [{"model": s.model, **asdict(s.result),
                    "fill_mask": [{"prompt": prompt, "masks": [[asdict(p) for p in per_mask] for per_mask in masks]}
                                  for prompt, masks in zip(prompts, s.fill_mask)]}
                   for s in scores],
    }


def as_table(args, eval_set: EvalSet, scores: list[ModelScore], prompts: list[str]) -> str:
    masking = "token-level masks" if eval_set.masking == "token" else "whole-word masks"
    lines = [f"{len(eval_set.input_ids):,} eval chunks of {args.chunk_size} tokens from "
             f"{args.validation_file or args.dataset} ({eval_source(args)} split, seed {args.seed}), {masking}, "
             f"{eval_set.masked_tokens:,} masked tokens", ""]
    rows = [("", [s.model for s in scores]),
            ("perplexity", [f"{s.result.perplexity:.3f}" for s in scores]),
            ("perplexity (reference-style)", [f"{s.result.reference_perplexity:.3f}" for s in scores]),
            ("loss", [f"{s.result.loss:.4f}" for s in scores]),
            ("masked-token accuracy", [f"{s.result.accuracy:.2%}" for s in scores])]
    for index, prompt in enumerate(prompts):
        rows.append((prompt, [""] * len(scores)))
        masks = len(scores[0].fill_mask[index])
        for mask in range(masks):
            for rank in range(args.top_k):
                label = f"  {'[MASK] #' + str(mask + 1) + ' ' if masks > 1 else ''}{rank + 1}"
                cells = []
                for s in scores:
                    predictions = s.fill_mask[index][mask]
                    cells.append(f"{predictions[rank].token} {predictions[rank].score:.3f}"
                                 if rank < len(predictions) else "")
                rows.append((label, cells))
    label_width = max(len(label) for label, _ in rows if label not in prompts)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(scores))]
    for label, cells in rows:
        if label in prompts and not any(cells):
            lines.append(label)  # a prompt heads its predictions, on a line of its own
            continue
        lines.append(f"{label:<{label_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def run() -> None:
    """The `mlm-evaluate` console script."""
    run_cli(main)


if __name__ == "__main__":
    run()
