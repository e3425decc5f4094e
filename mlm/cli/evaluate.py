"""Score models side by side on the same frozen eval set: perplexity, masked-token accuracy and fill-mask top-k.

Each --model is a Hub repo id or a local folder (config.json, model.safetensors, tokenizer.json), so the base
model, your runs and published fine-tunes compare alike. The data flags are mlm-train's. A --model that is a run
folder (it holds run.json) brings its eval set: every data flag not given is the run's, so the run's own
perplexity is reproduced exactly. Runs with different eval sets need the data flags that pick one.

Examples:
  # the base model against a run of mlm-train (its default --output-dir), on the run's eval set
  mlm-evaluate --model distilbert-base-uncased --model distilbert-base-uncased-finetuned-imdb
  # a published fine-tune (it needs a model.safetensors: mlm never loads pickled weights)
  mlm-evaluate --model huggingface-course/distilbert-base-uncased-finetuned-imdb
  mlm-evaluate --model runs/a --model runs/b --eval-masking wwm --json
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from mlm.cli.args import ArgumentParser, absolute_if_local, flags_given, size_flag
from mlm.cli.compare import EvalSet, ModelScore, compare_models
from mlm.cli.train import add_data_source_flags
from mlm.errors import MLMError, run_cli
from mlm.files.hub import set_progress_bars
from mlm.run.record import RunRecord, read_record
from mlm.settings import TrainConfig

DEFAULT_PROMPT = "This is a great [MASK]."
# The flags that decide the eval set (this parser's dest -> the run record's setting): a run folder's own values
# fill those not given, and two runs must agree on them.
EVAL_SET_FLAGS = {"dataset": "dataset", "text_column": "text_column", "train_splits": "train_splits",
                  "eval_split": "eval_split", "validation_file": "validation_file", "chunk_size": "chunk_size",
                  "group_size": "group_size", "train_size": "train_size", "test_size": "test_size",
                  "seed": "data_seed", "mlm_probability": "mlm_probability"}
# Taken from the first run when not given; they change no target. The eval batch size does change how the
# per-token losses are summed, so the run's own keeps its perplexity exact to the last bit.
RUN_DEFAULTS = {"cache_dir": "cache_dir", "eval_batch_size": "eval_batch_size"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--eval-batch-size", type=int, default=64,
                   help="eval chunks per forward pass; the reference-style perplexity depends on it, the headline "
                        "one does not (default: %(default)s)")

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
    parser = build_parser()
    args = parser.parse_args(argv)
    args.dataset, args.validation_file = absolute_if_local(args.dataset), absolute_if_local(args.validation_file)
    runs = run_records(args.models)
    args.from_run = follow_runs(args, flags_given(parser, argv), runs)
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
        masking=args.eval_masking, mlm_probability=args.mlm_probability, wwm_probability=args.wwm_probability,
        lean_models=[name for name, record in runs.items() if ran_lean(record)])
    if args.json:
        print(json.dumps(as_json(args, eval_set, scores, prompts), indent=2))
    else:
        print(as_table(args, eval_set, scores, prompts))


def run_records(names: list[str]) -> dict[str, RunRecord]:
    """{name: its run record} for each --model that is a run folder (or a checkpoint of one)."""
    records = {}
    for name in names:
        folder = Path(name).expanduser()
        record = read_record(folder) if folder.is_dir() else None
        if record is not None:
            records[name] = record
    return records


def follow_runs(args, given: set[str], runs: dict[str, RunRecord]) -> str | None:
    """Set every eval-set flag not given on the command line to the runs' value; return the run whose eval set this
    is, if any.

    Two runs that differ in a setting nobody gave would be scored on two eval sets: refused, naming the setting.
    """
    if not runs:
        return None
    for dest, key in EVAL_SET_FLAGS.items():
        if dest in given:
            continue
        values = {name: record.settings.get(key) for name, record in runs.items()}
        (first, value), *others = values.items()
        for other, other_value in others:
            if _same(value, other_value):
                continue
            flag = "--data-seed" if dest == "seed" else f"--{dest.replace('_', '-')}"
            raise MLMError(f"{first} and {other} were trained with different eval sets ({key} {value!r} vs "
                           f"{other_value!r}): pass {flag} (and any other data flag that differs) to score both on "
                           "one eval set.")
        setattr(args, dest, tuple(value) if dest == "train_splits" else value)
    first_run = next(iter(runs.values()))
    for dest, key in RUN_DEFAULTS.items():
        if dest not in given and first_run.settings.get(key) is not None:
            setattr(args, dest, first_run.settings[key])
    if any(dest in given and not _same(getattr(args, dest), first_run.settings.get(key))
           for dest, key in EVAL_SET_FLAGS.items()):
        return None  # a data flag given that differs from the run's: another eval set, not the run's own
    return next(iter(runs))


def _same(a, b) -> bool:
    # JSON turns the record's tuples into lists; compare what they hold.
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def ran_lean(record: RunRecord) -> bool:
    """Whether the run finished on mlm/speed/lean.py's modules (the run's last segment names its model variant)."""
    # The variant names the module its modules come from (mlm/train.py build_model); "--lean off" alone does not.
    return bool(record.segments) and "speed/lean.py" in str(record.segments[-1].get("model_variant", ""))


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
                     "masked_tokens": eval_set.masked_tokens, "seed": args.seed,
                     **({"from_run": args.from_run} if getattr(args, "from_run", None) else {})},
        "models": [{"model": s.model, **asdict(s.result),
                    "fill_mask": [{"prompt": prompt, "masks": [[asdict(p) for p in per_mask] for per_mask in masks]}
                                  for prompt, masks in zip(prompts, s.fill_mask)]}
                   for s in scores],
    }


def as_table(args, eval_set: EvalSet, scores: list[ModelScore], prompts: list[str]) -> str:
    masking = "token-level masks" if eval_set.masking == "token" else "whole-word masks"
    lines = [f"{len(eval_set.input_ids):,} eval chunks of {args.chunk_size} tokens from "
             f"{args.validation_file or args.dataset} ({eval_source(args)} split, seed {args.seed}), {masking}, "
             f"{eval_set.masked_tokens:,} masked tokens"
             + (f" (the eval set of the run in {args.from_run})" if getattr(args, "from_run", None) else ""), ""]
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
