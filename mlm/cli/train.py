"""Fine-tune DistilBERT with the masked-language-model objective on IMDb reviews (the Hugging Face course run).

With no arguments this reproduces the course: distilbert-base-uncased, stanfordnlp/imdb, 128-token chunks,
10,000 train / 1,000 eval chunks, 15% token masking (80/10/10), batch 64, AdamW lr 2e-5 with weight decay
0.01, linear decay, 3 epochs, mixed precision on a GPU. It reports perplexity before and after and fill-mask
predictions, and writes the fine-tuned model in the Hub layout to --output-dir.

Examples (mlm-train is `python scripts/train.py` in a checkout):
  mlm-train                                         # the course run (needs the Hub or the HF cache)
  mlm-train --smoke                                 # tiny offline run of every stage, < 1 minute on CPU
  mlm-train --model path/to/distilbert-base-uncased --init random \\
      --dataset path/to/imdb                        # local folders, random weights
  mlm-train --resume latest                         # continue an interrupted run
  torchrun --nproc_per_node 4 -m mlm.cli.train --batch-size 16   # 4 processes (DDP), global batch 64

Ctrl-C, SIGTERM or SIGHUP saves a checkpoint and exits (130, 143, 129); `mlm-train --resume latest --output-dir DIR`
continues with the settings recorded in DIR/run.json.
"""

import argparse
import os
import sys
from pathlib import Path

from mlm.cli.args import ArgumentParser, absolute_if_local, flags_given, size_flag
from mlm.errors import Interrupted, run_cli
from mlm.files.hub import set_progress_bars
from mlm.run.hub_push import full_repo_id, push_run
from mlm.run.session import resume_command, resumed_settings
from mlm.settings import TrainConfig
from mlm.train import train

SMOKE_DIR = Path(__file__).resolve().parents[1] / "smoke"
# A tiny random model (2 layers, dim 64) and 600 short synthetic reviews shipped in mlm/smoke/.
SMOKE = dict(
    model=str(SMOKE_DIR), init="random", dataset=str(SMOKE_DIR / "reviews.jsonl"), chunk_size=64, train_size=400,
    test_size=100, batch_size=16, eval_batch_size=32, lr=2e-3, warmup_steps=0.05, epochs=4, log_every=5, save_every=20,
    output_dir="runs/smoke", prompts=["this movie is a great [MASK] .", "i [MASK] this film ."],
    lean="off",  # a learner's first run executes the model they read in mlm/model.py
)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="Hub repo id or local folder with config.json (+ model.safetensors "
                   "for --init pretrained) and tokenizer.json (default: %(default)s)")
    g.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer repo id or folder, if not the model's own")
    g.add_argument("--revision", default=d.revision, help="Hub branch, tag or commit of --model")
    g.add_argument("--init", choices=["pretrained", "random"], default=d.init,
                   help="start from the pretrained weights, or from a random model of --model's config "
                        "(for from-scratch runs and when no weights are at hand) (default: %(default)s)")
    add_data_source_flags(g, d)
    g.add_argument("--chunk-size", type=int, default=d.chunk_size,
                   help="tokens per training example; reviews are concatenated and cut (default: %(default)s)")
    g.add_argument("--group-size", type=int, default=d.group_size,
                   help="concatenate per group of this many reviews, as datasets.map(batched=True) does with 1000, "
                        "to reproduce the course's chunk counts exactly (default: the whole split)")
    g.add_argument("--train-size", type=size_flag("--train-size"), default=d.train_size,
                   help="training chunks drawn, or 'all': every chunk not held out (default: %(default)s)")
    g.add_argument("--test-size", type=size_flag("--test-size"), default=d.test_size,
                   help="eval chunks drawn, or a percentage of the chunks such as 5%% (default: %(default)s)")
    g.add_argument("--cache-dir", default=d.cache_dir, help="where tokenized chunks are cached (default: $MLM_CACHE, "
                   "else $HF_HOME/mlm, else ~/.cache/mlm)")

    g = p.add_argument_group("masking")
    g.add_argument("--masking", choices=["token", "wwm"], default=d.masking,
                   help="token: 15%% of tokens, 80%% [MASK] / 10%% random / 10%% kept; wwm: whole words "
                        "(default: %(default)s). Evaluation always uses the same frozen token-level masks.")
    g.add_argument("--mlm-probability", type=float, default=d.mlm_probability,
                   help="share of tokens masked (token masking) (default: %(default)s)")
    g.add_argument("--wwm-probability", type=float, default=d.wwm_probability,
                   help="share of words masked (whole-word masking) (default: %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="chunks per micro-batch and process (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimizer step; global batch = batch size x grad accum x processes "
                        "(default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="eval chunks per forward pass; the reference-style perplexity depends on it, the headline "
                        "one does not (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="decoupled weight decay, not applied to biases and LayerNorms (default: %(default)s)")
    g.add_argument("--warmup-steps", type=float, default=d.warmup_steps,
                   help="linear warmup steps, or a fraction of all steps if below 1 (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=d.epochs,
                   help="passes over the training chunks (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="stop after this many optimizer steps; the schedule decays over them (default: all epochs)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="clip the gradients' global L2 norm to this (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seeds init, shuffling, training masks and dropout (default: %(default)s)")
    g.add_argument("--data-seed", type=int, default=d.data_seed,
                   help="seeds the train/eval draw and the frozen eval masks, so runs with different --seed are "
                        "scored on the same targets (default: %(default)s, the course's)")

    g = p.add_argument_group("hardware")
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=d.precision,
                   help="auto: bf16 autocast on GPUs that run bf16 natively, else fp16 with loss scaling; fp32 on "
                        "CPU. fp32 on a GPU is exact fp32 (TF32 matmuls stay off) (default: %(default)s)")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    g.add_argument("--cuda-graphs", nargs="?", const="on", choices=["off", "on", "auto"], default=d.cuda_graphs,
                   help="compile with CUDA graphs, so each step replays its kernels without launching them one by one "
                        "(label positions padded to a multiple of 256, which changes no value; one GPU, no "
                        "--grad-accum). auto: on one GPU when the run has enough steps to repay the compile; "
                        "--cuda-graphs alone means on; off: eager (default: %(default)s)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only each block's input for backward and recompute the rest: activation memory "
                        "down to about a sixth, slower steps (for batches that do not fit otherwise; the cost is in "
                        "docs/performance.md)")
    g.add_argument("--lean", choices=["auto", "on", "off"], default=d.lean,
                   help="the model variant that keeps less for backward (mlm/speed/lean.py: same values, less memory, "
                        "faster on CPUs); auto: on the CPU, off on GPUs, where the plain model's fused kernels "
                        "do that job (default: %(default)s)")
    g.add_argument("--release-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="on the CPU, let glibc hand freed memory back to the kernel as it does by default. By "
                        "default a CPU run keeps it for the next step instead: no page faults per step, more "
                        "tokens/s, peak memory within a few percent (docs/performance.md), but the resident "
                        "memory does not shrink until the process ends")
    g.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="DataLoader worker processes preparing masked batches (default: %(default)s)")

    g = p.add_argument_group("output, logging and checkpoints")
    g.add_argument("--output-dir", default=d.output_dir, help="run folder: run.json (the run record), metrics.jsonl, "
                   "checkpoints/, and the final model + tokenizer in the Hub layout (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=d.log_every,
                   help="steps between metrics.jsonl train lines (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="also evaluate every N steps (default: at the end of each epoch only)")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help="checkpoint every N steps, besides every epoch end (default: %(default)s)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="how many of the newest checkpoints to keep (default: %(default)s)")
    g.add_argument("--resume", nargs="?", const="latest", default=d.resume,
                   help="continue a run: 'latest' (the default when given alone) or a checkpoint folder. The run's "
                        "settings come from its record (run.json): no other flag is needed. Flags that change the "
                        "run (data, model, masking, optimisation, schedule, seeds) are refused; logging, workers, "
                        "eval batch size, prompts and the like may change")
    g.add_argument("--extend", action="store_true",
                   help="with --resume: allow a new --epochs or --max-steps; the linear decay is recomputed over the "
                        "new total, from the step the run is at")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir; it is kept aside until the new run has saved a "
                        "checkpoint, and put back if the new run fails before")
    g.add_argument("--prompt", dest="prompts", action="append", default=None,
                   help=f"fill-mask prompt shown before and after training; repeatable (default: {d.prompts[0]!r})")
    g.add_argument("--top-k", type=int, default=d.top_k, help="fill-mask predictions shown (default: %(default)s)")
    g.add_argument("--no-progress", dest="progress_bar", action="store_false",
                   help="no progress bars at all (training, tokenizing, Hub downloads)")
    g.add_argument("--report-to", choices=["none", "tensorboard"], default=d.report_to,
                   help="tensorboard: also write loss, lr, grad norm, tokens/s and eval figures to "
                        "OUTPUT_DIR/tensorboard (needs `pip install tensorboard`) (default: %(default)s)")

    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--push-to-hub", action="store_true", help="at the end of a finished run, upload the model, its "
                   "tokenizer, the model card and the logs to the Hub (token: HF_TOKEN or `hf auth login`)")
    g.add_argument("--hub-model-id", default=d.hub_model_id, help="the repo: 'name' (in your namespace) or "
                   "'namespace/name' (default: the --output-dir folder's name)")
    g.add_argument("--hub-private", action="store_true", default=None,
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--smoke", action="store_true", help="offline end-to-end run: tiny random model, 600 shipped "
                   "synthetic reviews, 4 epochs (other flags still apply on top); it replaces its own previous run "
                   "in runs/smoke, so it can be rerun as is")
    return p


def add_data_source_flags(g: argparse._ArgumentGroup, d: TrainConfig) -> None:
    """Where the texts come from: shared with mlm-evaluate, which rebuilds a run's eval set from them."""
    g.add_argument("--dataset", default=d.dataset, help="Hub dataset id, a local folder (the Hub layout, or data "
                   "files at any depth), a quoted glob, or one file: .parquet, or .jsonl/.csv/.txt, plain or .gz/.zst "
                   "(docs/corpora.md) (default: %(default)s)")
    g.add_argument("--text-column", default=d.text_column, help="column holding the text (default: %(default)s)")
    g.add_argument("--train-splits", type=split_list, default=d.train_splits, metavar="SPLIT[,SPLIT...]",
                   help="splits of --dataset to train on, concatenated, e.g. train,unsupervised for IMDb's 50,000 "
                        "unlabelled reviews too (default: train)")
    g.add_argument("--eval-split", default=d.eval_split, help="draw the eval chunks from this split of --dataset "
                   "(e.g. test) instead of holding them out of the train chunks as the course does")
    g.add_argument("--validation-file", default=d.validation_file,
                   help="draw the eval chunks from this .parquet/.jsonl/.csv/.txt file instead")


def split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    smoke = "--smoke" in argv
    if smoke:
        parser.set_defaults(**SMOKE)
    args = vars(parser.parse_args(argv))
    args.pop("smoke")
    args["prompts"] = tuple(args["prompts"] or TrainConfig.prompts)
    for name in ("model", "tokenizer", "dataset", "validation_file", "cache_dir"):
        args[name] = absolute_if_local(args[name], always=name == "cache_dir")  # run.json is read elsewhere too
    if args["resume"]:
        # A resume continues with the run's recorded settings; only the flags typed now change them.
        given = {name: args[name] for name in flags_given(build_parser(), argv) if name != "smoke"}
        args.update(resumed_settings(args["output_dir"], args["resume"], given))
    elif smoke and args["output_dir"] == SMOKE["output_dir"]:
        args["overwrite"] = True  # a smoke run is a throwaway: rerunning it replaces the last one
    set_progress_bars(args["progress_bar"])
    pushes = args["push_to_hub"] and int(os.environ.get("RANK", 0)) == 0
    if pushes:
        # The token and the repo's namespace are checked now, not after hours of training.
        args["hub_model_id"] = full_repo_id(args["hub_model_id"] or Path(args["output_dir"]).name)
    summary = train(TrainConfig(**args))
    print_summary(summary)
    if summary.status == "interrupted":
        sys.exit(Interrupted(summary.stopped_by or "SIGINT").exit_code)
    if pushes:
        print(f"Pushed to {push_run(summary.output_dir, args['hub_model_id'], private=args['hub_private'])}")


def print_summary(summary) -> None:
    rows = [("status", summary.status), ("optimizer steps", f"{summary.steps}"),
            ("training time", f"{summary.train_seconds:.1f} s"),
            ("training tokens/s", f"{summary.train_tokens_per_second:,.0f}")]
    if summary.before:
        rows.append(("perplexity before", f"{summary.before.perplexity:.3f} (reference-style "
                                          f"{summary.before.reference_perplexity:.3f})"))
    if summary.after:
        rows.append(("perplexity after", f"{summary.after.perplexity:.3f} (reference-style "
                                         f"{summary.after.reference_perplexity:.3f})"))
        rows.append(("masked-token accuracy", f"{summary.after.accuracy:.2%}"))
    rows.append(("output", summary.output_dir if summary.status == "finished" else f"checkpoint {summary.checkpoint}"))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    if summary.status == "interrupted":
        print(f"Continue with: {resume_command(Path(summary.output_dir), int(os.environ.get('WORLD_SIZE', 1)))}")


def run() -> None:
    """The `mlm-train` console script."""
    run_cli(main)


if __name__ == "__main__":
    run()
