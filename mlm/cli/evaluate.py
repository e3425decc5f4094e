"""Score models side by side on the same frozen eval set: perplexity, masked-token accuracy and fill-mask top-k.

Each --model is a Hub repo id or a local folder (config.json, model.safetensors, tokenizer.json), so the base
model, your runs and published fine-tunes compare alike. The data flags are mlm-train's. A --model that is a run
folder (it holds run.json) brings its eval set and its prompts: every data flag not given is the run's, so the
run's own perplexity is reproduced exactly. Runs with different eval sets need the data flags that pick one.

Examples:
  # the base model against a run of mlm-train (its default --output-dir), on the run's eval set
  mlm-evaluate --model distilbert-base-uncased --model distilbert-base-uncased-finetuned-imdb
  # a published fine-tune (it needs a model.safetensors: mlm never loads pickled weights)
  mlm-evaluate --model huggingface-course/distilbert-base-uncased-finetuned-imdb
  mlm-evaluate --model runs/a --model runs/b --eval-masking wwm --json
"""

import json
import sys
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path

from mlm.cli.args import ArgumentParser, absolute_if_local, add_settings, flags_given, run_command, settings_given
from mlm.compare import EvalSet, ModelScore, compare_models
from mlm.errors import MLMError
from mlm.files.hub import set_progress_bars
from mlm.run.folder import unfinished_run
from mlm.run.processes import pick_device
from mlm.run.record import RunRecord, read_record
from mlm.run.session import compare_data, data_file_digests
from mlm.settings import TrainConfig
from mlm.speed.path import pick_precision

# The settings that decide the eval set: a run folder's own values fill those not given, and two runs must agree.
EVAL_SET_SETTINGS = ("dataset", "text_column", "train_splits", "eval_split", "validation_file", "chunk_size",
                     "group_size", "test_size", "data_seed", "mlm_probability")
# Taken from the first run when not given; they change no target. The eval batch size does change how the
# per-token losses are summed, so the run's own keeps its perplexity exact to the last bit. (A run's `train_size`
# is none of them: its eval chunks are drawn before its train chunks, and so without them.)
RUN_DEFAULTS = ("cache_dir", "eval_batch_size", "prompts", "top_k")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", dest="models", action="append", required=True,
                   help="Hub repo id or local model folder; repeat to compare several")
    p.add_argument("--tokenizer", default=None, help="tokenizer repo id or folder for every model, if not their own")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--eval-masking", choices=["token", "wwm"], default="token",
                   help="token: 15%% of tokens, 80/10/10, the eval set of every training run; wwm: whole words, "
                        "all their tokens [MASK] (default: %(default)s)")
    add_settings(p, [*EVAL_SET_SETTINGS, "wwm_probability", *RUN_DEFAULTS], group="eval set and prompts "
                 "(mlm-train's flags; a run folder as --model brings its own)", helps={
                     "train_splits": "splits of --dataset the eval chunks are held out of, as the run trained on them "
                                     "(default: train)",
                     "prompts": "fill-mask prompt each model completes; repeatable",
                     "wwm_probability": "with --eval-masking wwm, the share of words masked; never a run's, whose "
                                        "eval set is token-masked"})
    add_settings(p, ["precision", "device", "progress_bar"], group="hardware")
    p.hints["--train-size"] = "mlm-evaluate draws no train chunks: --test-size sets the eval set"
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.dataset, args.validation_file = absolute_if_local(args.dataset), absolute_if_local(args.validation_file)
    args.prompts = tuple(args.prompts or TrainConfig.prompts)
    runs = run_records(args.models)
    from_run = follow_runs(args, flags_given(parser, argv), runs)
    args.from_run = from_run if args.eval_masking == "token" else None  # a run's eval set is never whole-word masked
    TrainConfig(**settings_given(args)).validate()
    set_progress_bars(args.progress_bar)
    device = pick_device(args.device)
    data = {name: getattr(args, name) for name in (*EVAL_SET_SETTINGS, "wwm_probability", "cache_dir")}
    eval_set, scores = compare_models(
        args.models, tokenizer=args.tokenizer, prompts=args.prompts, top_k=args.top_k,
        batch_size=args.eval_batch_size, device=device,
        autocast_dtype=pick_precision(args.precision, device).autocast_dtype, progress=args.progress_bar,
        masking=args.eval_masking, seed=data.pop("data_seed"), **data)
    for note in trained_on(args, runs, len(eval_set.input_ids)):
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(as_json(args, eval_set, scores), indent=2) if args.json else as_table(args, eval_set, scores))


def run_records(names: list[str]) -> dict[str, RunRecord]:
    """{name: its run record} for each --model that is a run folder (or a checkpoint of one)."""
    records = {}
    for name in names:
        folder = Path(name).expanduser()
        if folder.is_dir() and (record := read_record(folder)) is not None:
            if why := unfinished_run(folder):
                raise MLMError(why)
            records[name] = record
    return records


def follow_runs(args, given: set[str], runs: dict[str, RunRecord]) -> str | None:
    """Set every eval-set setting not given on the command line to the runs' value; return the run whose eval set
    this is, if any. Runs that differ in settings nobody gave would be scored on two eval sets: refused, listing
    every such setting at once."""
    if not runs:
        return None
    (first, record), *others = runs.items()
    differ = [f"`{name}` {record.settings.get(name)!r} in {first} vs {theirs.settings.get(name)!r} in {other}"
              for name in EVAL_SET_SETTINGS if name not in given for other, theirs in others
              if record.settings.get(name) != theirs.settings.get(name)]
    if differ:
        raise MLMError(f"The runs were trained with different eval sets ({'; '.join(differ)}): give those flags to "
                       "score every model on one eval set.")
    recorded = recorded_settings(record)
    for name in (*EVAL_SET_SETTINGS, *RUN_DEFAULTS):
        if name not in given and name in recorded:
            setattr(args, name, recorded[name])
    differs = {name for name in EVAL_SET_SETTINGS if name in given and getattr(args, name) != recorded.get(name)}
    if differs - {"dataset", "validation_file"}:
        return None  # a data flag given that differs from the run's: another eval set, not the run's own
    try:  # the run's data, or the same bytes given at their new place
        compare_data(record.data.get("files", {}), data_file_digests(TrainConfig(**settings_given(args))))
    except MLMError as err:
        if differs:
            return None  # other data
        raise MLMError(f"The eval set of the run in {first} cannot be rebuilt: {err} If the data moved, give its new "
                       "place (`dataset`, `validation_file`); to score the models on other data, give the data "
                       "flags.") from None
    return first


def recorded_settings(record: RunRecord) -> dict:
    return {name: tuple(value) if isinstance(value, list) else value  # JSON gives the record's tuples back as lists
            for name, value in record.settings.items()}


def trained_on(args, runs: dict[str, RunRecord], eval_chunks: int) -> list[str]:
    """A note for each run that trained on some of the eval chunks: the run's own draw with more test chunks than it
    held out, whose extra ones are the first it trained on (the test chunks are drawn first, the train ones next)."""
    notes = []
    for name, record in runs.items():
        held_out, trained = record.derived.get("eval_chunks"), record.derived.get("train_chunks")
        recorded, where = recorded_settings(record), {"test_size", "dataset", "validation_file"}
        same_draw = all(getattr(args, setting) == recorded.get(setting) for setting in EVAL_SET_SETTINGS
                        if setting not in where) and not (args.eval_split or args.validation_file)
        if not (same_draw and held_out is not None and trained is not None and eval_chunks > held_out):
            continue
        with suppress(MLMError):  # the run's data, wherever it is now: the same bytes in the same order
            compare_data(record.data.get("files", {}), data_file_digests(TrainConfig(**settings_given(args))))
            notes.append(f"{min(eval_chunks, held_out + trained) - held_out} of the {eval_chunks} eval chunks are "
                         f"chunks the run in {name} trained on: its figures flatter it. Keep --test-size at most "
                         f"{held_out}, the chunks it held out, to score it on unseen text.")
    return notes


def eval_source(args) -> str:
    """The split the eval chunks come from: held out of the training splits unless --eval-split/--validation-file."""
    return "train" if args.validation_file else args.eval_split or "+".join(args.train_splits)  # a file: its one split


def as_json(args, eval_set: EvalSet, scores: list[ModelScore]) -> dict:
    return {
        "eval_set": {"dataset": args.validation_file or args.dataset, "split": eval_source(args),
                     "chunks": len(eval_set.input_ids), "chunk_size": args.chunk_size, "masking": eval_set.masking,
                     "masked_tokens": eval_set.masked_tokens, "seed": args.data_seed,
                     **({"from_run": args.from_run} if args.from_run else {})},
        "models": [{"model": s.model, **asdict(s.result),
                    "fill_mask": [{"prompt": prompt, "masks": [[asdict(p) for p in per_mask] for per_mask in masks]}
                                  for prompt, masks in zip(args.prompts, s.fill_mask)]}
                   for s in scores],
    }


def as_table(args, eval_set: EvalSet, scores: list[ModelScore]) -> str:
    masking = "token-level masks" if eval_set.masking == "token" else "whole-word masks"
    where = (f"{args.validation_file} (" if args.validation_file  # a validation file is read whole: no split
             else f"{args.dataset} ({eval_source(args)} split, ")
    lines = [f"{len(eval_set.input_ids):,} eval chunks of {args.chunk_size} tokens from {where}seed "
             f"{args.data_seed}), {masking}, {eval_set.masked_tokens:,} masked tokens"
             + (f" (the eval set of the run in {args.from_run})" if args.from_run else ""), ""]
    rows = [("", [s.model for s in scores]),
            ("perplexity", [f"{s.result.perplexity:.3f}" for s in scores]),
            ("perplexity (reference-style)", [f"{s.result.reference_perplexity:.3f}" for s in scores]),
            ("loss", [f"{s.result.loss:.4f}" for s in scores]),
            ("masked-token accuracy", [f"{s.result.accuracy:.2%}" for s in scores])]
    for index, prompt in enumerate(args.prompts):
        rows.append((prompt, None))  # a prompt heads its predictions, on a line of its own
        masks = len(scores[0].fill_mask[index])
        for mask in range(masks):
            predictions = [s.fill_mask[index][mask] for s in scores]
            for rank in range(max(map(len, predictions))):  # top_k, or the vocabulary when it is smaller
                label = f"  {'[MASK] #' + str(mask + 1) + ' ' if masks > 1 else ''}{rank + 1}"
                rows.append((label, [f"{p[rank].token} {p[rank].score:.3f}" if rank < len(p) else ""
                                     for p in predictions]))
    label_width = max(len(label) for label, cells in rows if cells is not None)
    widths = [max(len(cells[i]) for _, cells in rows if cells is not None) for i in range(len(scores))]
    for label, cells in rows:
        lines.append(label if cells is None else
                     f"{label:<{label_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def run() -> None:
    """The `mlm-evaluate` console script."""
    run_command(main)


if __name__ == "__main__":
    run()
