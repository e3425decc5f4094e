"""Train a DistilBERT, BERT or RoBERTa model further with the masked-language-model objective on your domain's
text; by default the Hugging Face course run, DistilBERT on IMDb reviews.

The defaults are the course's: distilbert-base-uncased, stanfordnlp/imdb, 128-token chunks, 10,000 train / 1,000
eval chunks, 15% token masking (80/10/10), batch 64, AdamW lr 2e-5 with weight decay 0.01, linear decay, 3 epochs,
mixed precision on a GPU; add --group-size 1000 --log-every 156 for the course's exact chunk counts and log
lines. It reports perplexity before and after and fill-mask predictions, and writes the fine-tuned model in the
Hub layout to --output-dir.

Examples (mlm-train is `python scripts/train.py` in a checkout):
  mlm-train --group-size 1000 --log-every 156       # the course run (needs the Hub or the HF cache)
  mlm-train --smoke                                 # tiny offline run of every stage, < 1 minute on CPU
  mlm-train --model path/to/distilbert-base-uncased --init random \\
      --dataset path/to/imdb                        # local folders, random weights
  mlm-train --resume latest                         # continue an interrupted run
  torchrun --nproc_per_node 4 -m mlm.cli.train --batch-size 16   # 4 processes (DDP), global batch 64

Ctrl-C, SIGTERM or SIGHUP saves a checkpoint and exits (130, 143, 129); `mlm-train --resume latest --output-dir DIR`
continues with the settings recorded in DIR/run.json.
"""

import os
import sys
from pathlib import Path

from mlm.cli.args import ArgumentParser, absolute_if_local, add_settings, flags_given, run_command, settings_given
from mlm.errors import Interrupted, MLMError
from mlm.files.hub import set_progress_bars
from mlm.run.folder import folder_record, record_to_resume
from mlm.run.hub_push import full_repo_id, push_run
from mlm.run.processes import Processes
from mlm.run.session import resume_command
from mlm.settings import HUB, TrainConfig
from mlm.train import train

SMOKE_DIR = Path(__file__).resolve().parents[1] / "smoke"
# A tiny random model (2 layers, dim 64) and 600 short synthetic reviews shipped in mlm/smoke/.
SMOKE = dict(
    model=str(SMOKE_DIR), init="random", dataset=str(SMOKE_DIR / "reviews.jsonl"), chunk_size=64, train_size=400,
    test_size=100, batch_size=16, eval_batch_size=32, lr=2e-3, warmup_steps=0.05, epochs=4, log_every=5, save_every=20,
    output_dir="runs/smoke", prompts=["this movie is a great [MASK] .", "i [MASK] this film ."],
    # A learner's first run executes the code they read: mlm/model.py and mlm/data.py's tokenizer call.
    lean="off", fast_tokenize="off",
)
LOCAL_SETTINGS = ("model", "tokenizer", "dataset", "validation_file", "cache_dir", "add_tokens")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    hub = add_settings(parser)[HUB]
    hub.add_argument("--push-to-hub", action="store_true", help="at the end of a finished run, upload the model, its "
                     "tokenizer, the model card, run.json, metrics.jsonl and tensorboard/ if written (nothing else in "
                     "the folder) to the Hub (token: HF_TOKEN or `hf auth login`)")
    hub.add_argument("--hub-private", action="store_true", default=None,
                     help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--smoke", action="store_true", help="offline end-to-end run: tiny random model, 600 shipped "
                        "synthetic reviews, 4 epochs (other flags still apply on top); it replaces its own previous "
                        "run in runs/smoke, so it can be rerun as is")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    smoke = "--smoke" in argv
    if smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    settings = settings_given(args)
    for name in LOCAL_SETTINGS:  # run.json is read from other directories too
        if not str(settings[name]).isdigit():  # `add_tokens` N is a count, not a file
            settings[name] = absolute_if_local(settings[name], always=name == "cache_dir")
    settings["output_dir"] = TrainConfig(**settings).output_dir  # the default one is named after the model and data
    if settings["resume"]:
        settings = resumed_settings(settings, flags_given(parser, argv))
    elif smoke and settings["output_dir"] == SMOKE["output_dir"]:
        settings["overwrite"] = replaces_smoke_run(Path(settings["output_dir"]))
    set_progress_bars(settings["progress_bar"])
    if args.hub_private and not args.push_to_hub:
        raise MLMError("--hub-private makes the repo that --push-to-hub creates private: add --push-to-hub, or leave "
                       "--hub-private out.")
    pushes = args.push_to_hub and int(os.environ.get("RANK", 0)) == 0
    if pushes:
        # The token and the repo's namespace are checked now, not after hours of training.
        settings["hub_model_id"] = full_repo_id(settings["hub_model_id"] or Path(settings["output_dir"]).name,
                                                private=args.hub_private)
    # The push is this command's, not a setting of the run: a command that continues the run must ask for it again.
    again = (" --push-to-hub" + " --hub-private" * bool(args.hub_private)) if args.push_to_hub else ""
    try:
        summary = train(TrainConfig(**settings))
    except Interrupted as stop:
        stop.hint += again if stop.hint.startswith("Continue with:") else ""
        raise
    if summary.is_main:
        print_summary(summary, again)
    if summary.status == "interrupted":
        sys.exit(Interrupted(summary.stopped_by or "SIGINT").exit_code)
    if pushes:
        print(f"Pushed to {push_run(summary.output_dir, settings['hub_model_id'], private=args.hub_private)}")


def resumed_settings(settings: dict, given: set[str]) -> dict:
    """The settings of a resume: the run's recorded ones (its run.json, else its newest checkpoint's copy; into a
    folder without a run, the given checkpoint's copy), the flags typed now on top (a run-defining one that differs
    is refused later, listing the differences). A checkpoint given without --output-dir continues in its own run's
    folder, and an older checkpoint of the run continues the run as run.json defines it now (--extend included)."""
    checkpoint = None if settings["resume"] == "latest" else Path(settings["resume"]).expanduser()
    if checkpoint is not None and "output_dir" not in given and checkpoint.parent.name == "checkpoints":
        settings["output_dir"] = str(checkpoint.parent.parent)
    record = next((found for source in (Path(settings["output_dir"]).expanduser(), checkpoint)
                   if source is not None and source.is_dir() and (found := record_to_resume(source)) is not None), None)
    if record is None:
        return settings
    kept = ("output_dir", "resume", "overwrite", "extend")
    stored = {name: tuple(value) if isinstance(value, list) else value for name, value in record.settings.items()
              if name in TrainConfig.__dataclass_fields__ and name not in kept}
    for name in ("model", "tokenizer", "dataset", "validation_file"):  # recorded as absolute paths when local
        if name not in given and (value := stored.get(name)) and Path(value).is_absolute() and not Path(value).exists():
            raise MLMError(f"The run's `{name}`, {value}, is not there any more: if it moved, resume with `{name}` set "
                           "to where it is now (the run checks that it is the same).")
    return {**settings, **stored, **{name: settings[name] for name in given if name in settings}}


def replaces_smoke_run(folder: Path) -> bool:
    """Whether --smoke may replace what is in its default folder: nothing there, or an earlier smoke run."""
    record = folder_record(folder) if folder.is_dir() else None
    if record is None:
        return False
    if (record.settings.get("model"), record.settings.get("dataset")) != (SMOKE["model"], SMOKE["dataset"]):
        raise MLMError(f"{folder} holds a run that --smoke did not make, and --smoke replaces only its own earlier "
                       "run: give the smoke run another output folder (--output-dir).")
    return True


def print_summary(summary, again: str = "") -> None:
    """The run's figures; for an interrupted run, the command that continues it (`again`: flags to add to it)."""
    rows = [("status", summary.status), ("optimizer steps", f"{summary.steps}"),
            ("training time", f"{summary.train_seconds:.1f} s"),
            ("training tokens/s", f"{summary.train_tokens_per_second:,.0f}")]
    rows += [(f"perplexity {when}", f"{result.perplexity:.3f} (reference-style {result.reference_perplexity:.3f})")
             for when, result in (("before", summary.before), ("after", summary.after)) if result]
    if summary.after:
        rows.append(("masked-token accuracy", f"{summary.after.accuracy:.2%}"))
    rows.append(("output", summary.output_dir if summary.status == "finished" else f"checkpoint {summary.checkpoint}"))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    if summary.status == "interrupted":
        world = Processes(world_size=int(os.environ.get("WORLD_SIZE", 1)))
        print(f"Continue with: {resume_command(Path(summary.output_dir), world)}{again}")


def run() -> None:
    """The `mlm-train` console script."""
    run_command(main)


if __name__ == "__main__":
    run()
