"""The settings of a training run: `TrainConfig`, each field with its default and its help, and which define a run.

mlm-train's flags, the walkthrough's and mlm-evaluate's data flags are all made from these fields (mlm/cli/args.py).
Both the loop (mlm/train.py) and the run layer (mlm/run/) read the settings; a module of their own lets the run
layer record and compare them without importing the loop.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field

from mlm.chunks import parse_size
from mlm.errors import MLMError, is_int
from mlm.files.hub import check_repo_id, short_name
from mlm.optim import SCHEDULES

MAX_SEED = 2**63 - 1  # seeds are offset by the epoch and fed to torch and numpy generators, which take 64 bits
MODEL_AND_DATA, MASKING, OPTIMISATION, HARDWARE, OUTPUT, HUB = (
    "model and data", "masking", "optimisation", "hardware", "output, logging and checkpoints", "Hugging Face Hub")


def setting(default, help: str, group: str, **argparse_options):
    """A TrainConfig field: its default, and how its flag reads (`help`, the `group` of --help it is listed in, and
    any argparse option: choices, type, action, flag, metavar)."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_options})


@dataclass
class TrainConfig:
    """Every setting of a run. The defaults are the course's Trainer run, but for mixed precision, which is picked by
    the device (--precision auto), and the group size (the course's chunk counts need --group-size 1000)."""

    model: str = setting("distilbert-base-uncased", "Hub repo id or local folder with config.json (+ "
                         "model.safetensors for --init pretrained) and tokenizer.json", MODEL_AND_DATA)
    tokenizer: str | None = setting(None, "tokenizer repo id or folder, if not the model's own", MODEL_AND_DATA)
    revision: str | None = setting(None, "Hub branch, tag or commit of --model", MODEL_AND_DATA)
    init: str = setting("pretrained", "start from the pretrained weights, or from a random model of --model's config "
                        "(for from-scratch runs and when no weights are at hand)", MODEL_AND_DATA,
                        choices=("pretrained", "random"))
    config_overrides: str | None = setting(None, "with --init random: change keys of --model's config.json, e.g. "
                                           "n_layers=4,dim=256 (run_mlm's --config_overrides)", MODEL_AND_DATA,
                                           metavar="KEY=VALUE[,...]")
    dataset: str = setting("stanfordnlp/imdb", "Hub dataset id, a local folder (the Hub layout, or data files at any "
                           "depth), a quoted glob, or one file: .parquet, or .jsonl/.csv/.txt, plain or .gz/.zst "
                           "(docs/corpora.md)", MODEL_AND_DATA)
    text_column: str = setting("text", "column holding the text in parquet, JSON-lines and CSV files",
                               MODEL_AND_DATA)
    train_splits: tuple[str, ...] = setting(("train",), "splits of --dataset to train on, concatenated, e.g. "
                                            "train,unsupervised for IMDb's 50,000 unlabelled reviews too (default: "
                                            "train)", MODEL_AND_DATA, type="splits", metavar="SPLIT[,SPLIT...]")
    eval_split: str | None = setting(None, "draw the eval chunks from this split of --dataset (e.g. test) instead of "
                                     "holding them out of the train chunks as the course does", MODEL_AND_DATA)
    validation_file: str | None = setting(None, "draw the eval chunks from this .parquet/.jsonl/.csv/.txt file "
                                          "instead", MODEL_AND_DATA)
    chunk_size: int = setting(128, "tokens per training example; reviews are concatenated and cut", MODEL_AND_DATA)
    group_size: int | None = setting(None, "concatenate per group of this many reviews, as datasets.map(batched=True) "
                                     "does with 1000, to reproduce the course's chunk counts exactly (default: the "
                                     "whole split)", MODEL_AND_DATA, type=int)
    train_size: int | str = setting(10_000, "training chunks drawn: a count, a percentage of the chunks such as 80%, "
                                    "or 'all' (every chunk not held out)", MODEL_AND_DATA, type="size")
    test_size: int | str = setting(1_000, "eval chunks drawn: a count, or a percentage of the chunks such as 5%",
                                   MODEL_AND_DATA, type="size")
    cache_dir: str | None = setting(None, "where tokenized chunks are stored (default: $MLM_CACHE, else "
                                    "$HF_HOME/mlm, ~/.cache/huggingface/mlm unless HF_HOME is set)", MODEL_AND_DATA)
    add_tokens: int | str | None = setting(None, "add new tokens to the tokenizer, and rows to the model, for the N "
                                           "words of letters of the training splits that it cuts in the most tokens "
                                           "(occurrences x (pieces - 1); mlm-prepare-data --vocab-report lists them), "
                                           "or for the words of FILE, one per line; each new row starts as the mean "
                                           "of its pieces' (docs/base-models.md)", MODEL_AND_DATA, metavar="N|FILE")
    fast_tokenize: str = setting("on", "tokenize with mlm/speed/fast_encode.py's exact shortcuts where its start-up "
                                 "check shows them exact for the tokenizer (same chunks, faster); off: the plain "
                                 "tokenizer call", MODEL_AND_DATA, choices=("on", "off"))

    masking: str = setting("token", "token: 15% of tokens, 80% [MASK] / 10% random / 10% kept; wwm: whole words. "
                           "Evaluation always uses the same frozen token-level masks", MASKING,
                           choices=("token", "wwm"))
    mlm_probability: float = setting(0.15, "share of tokens masked (token masking, and the eval masks)", MASKING)
    wwm_probability: float = setting(0.2, "share of words masked (whole-word masking)", MASKING)

    batch_size: int = setting(64, "chunks per micro-batch and process", OPTIMISATION)
    grad_accum: int = setting(1, "micro-batches per optimizer step; global batch = batch size x grad accum x "
                              "processes", OPTIMISATION)
    eval_batch_size: int = setting(64, "eval chunks per forward pass; the reference-style perplexity depends on it, "
                                   "the headline one does not", OPTIMISATION)
    lr: float = setting(2e-5, "peak AdamW learning rate", OPTIMISATION)
    weight_decay: float = setting(0.01, "decoupled weight decay, not applied to biases and LayerNorms", OPTIMISATION)
    warmup_steps: float = setting(0, "linear warmup steps, or a fraction of all steps if below 1", OPTIMISATION,
                                  type="count_or_fraction")
    lr_scheduler: str = setting("linear", "the learning rate after the warmup, as transformers' schedule of that "
                                "name: linear or cosine decay to 0, or constant (constant has no warmup)",
                                OPTIMISATION, choices=SCHEDULES)
    adam_beta1: float = setting(0.9, "AdamW's beta1 (decay of the gradients' running mean)", OPTIMISATION)
    adam_beta2: float = setting(0.999, "AdamW's beta2 (decay of the squared gradients' running mean)", OPTIMISATION)
    adam_epsilon: float = setting(1e-8, "AdamW's epsilon, added to the denominator", OPTIMISATION)
    epochs: int = setting(3, "passes over the training chunks", OPTIMISATION)
    max_steps: int | None = setting(None, "train for this many optimizer steps, over as many epochs as they "
                                    "take (it overrides --epochs, as Trainer's max_steps); the schedule decays over "
                                    "them", OPTIMISATION, type=int)
    max_grad_norm: float = setting(1.0, "clip the gradients' global L2 norm to this; 0: no clipping (the course's "
                                   "Accelerate loop)", OPTIMISATION)
    seed: int = setting(42, "seeds init, shuffling, training masks and dropout", OPTIMISATION)
    data_seed: int = setting(42, "seeds the train/eval draw and the frozen eval masks, so runs with different --seed "
                             "are scored on the same targets (the course's 42)", OPTIMISATION)

    precision: str = setting("auto", "auto: bf16 autocast on GPUs that run bf16 natively, else fp16 (with loss "
                             "scaling in training); fp32 on CPU. fp32 on a GPU is exact fp32 (TF32 matmuls stay off)",
                             HARDWARE, choices=("auto", "fp32", "fp16", "bf16"))
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", HARDWARE)
    compile: bool = setting(False, "torch.compile the model (slow start, faster steps)", HARDWARE)
    cuda_graphs: str = setting("auto", "compile with CUDA graphs, so each step replays its kernels without launching "
                               "them one by one (label positions padded to a multiple of 256, which changes no value; "
                               "one GPU, no --grad-accum). auto: on one GPU when the run has enough steps to repay "
                               "the compile; --cuda-graphs alone means on; off: eager", HARDWARE,
                               choices=("off", "on", "auto"), nargs="?", const="on")
    gradient_checkpointing: bool = setting(False, "keep only each block's input for backward and recompute the rest: "
                                           "activation memory down to about a sixth, slower steps (for batches that "
                                           "do not fit otherwise; docs/performance.md has the cost)", HARDWARE)
    lean: str = setting("auto", "the model variant that keeps less for backward (mlm/speed/lean.py: the same values "
                        "up to rounding and the same dropout draws, less memory, faster on CPUs); auto: on the CPU, "
                        "off on GPUs, where the plain model's fused kernels do that job", HARDWARE,
                        choices=("auto", "on", "off"))
    keep_freed_memory: bool = setting(True, "on the CPU, let glibc hand freed memory back to the kernel as it does by "
                                      "default. By default a CPU run keeps it for the next step instead: no page "
                                      "faults per step, more tokens/s, peak memory within a few percent "
                                      "(docs/performance.md), but the resident memory does not shrink until the "
                                      "process ends", HARDWARE, flag="--release-freed-memory")
    num_workers: int = setting(0, "DataLoader worker processes preparing masked batches", HARDWARE)

    output_dir: str | None = setting(None, "run folder: run.json (the run record), metrics.jsonl, checkpoints/, and "
                                     "the final model + tokenizer in the Hub layout; an empty or new folder, or one "
                                     "holding a run (default: MODEL-finetuned-DATA after the names of --model and "
                                     "--dataset, as the course's distilbert-base-uncased-finetuned-imdb; "
                                     "MODEL-scratch-DATA with --init random)", OUTPUT)
    log_every: int = setting(10, "a training log line at every N-th step of the run (and at each epoch's end)", OUTPUT)
    eval_every: int | None = setting(None, "also evaluate every N steps (default: at the end of each epoch only)",
                                     OUTPUT, type=int)
    save_every: int | None = setting(500, "checkpoint every N steps, besides every epoch end", OUTPUT, type=int)
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep", OUTPUT)
    resume: str | None = setting(None, "continue a run: 'latest' (the default when given alone) or a checkpoint "
                                 "folder. The run's settings come from its record (run.json): no other flag is "
                                 "needed. Flags that change the run (data, model, masking, optimisation, schedule, "
                                 "seeds) are refused; logging, workers, eval batch size, prompts and the like may "
                                 "change", OUTPUT, nargs="?", const="latest")
    extend: bool = setting(False, "with --resume: allow a new --epochs or --max-steps; the schedule is recomputed "
                           "over the new total, from the step the run is at", OUTPUT)
    overwrite: bool = setting(False, "replace the run already in --output-dir; it is kept aside until the new run "
                              "has saved a checkpoint, and put back if the new run fails before", OUTPUT)
    prompts: tuple[str, ...] = setting(("This is a great [MASK].",), "fill-mask prompt shown before and after "
                                       "training; repeatable", OUTPUT, flag="--prompt", action="append")
    top_k: int = setting(5, "fill-mask predictions shown", OUTPUT)
    progress_bar: bool = setting(True, "no progress bars at all (training or scoring, tokenizing, Hub "
                                 "downloads)", OUTPUT, flag="--no-progress")
    report_to: str = setting("none", "tensorboard: also write loss, lr, grad norm, tokens/s and eval figures to "
                             "OUTPUT_DIR/tensorboard (needs `pip install tensorboard`)", OUTPUT,
                             choices=("none", "tensorboard"))
    hub_model_id: str | None = setting(None, "the Hub repo the model card names and --push-to-hub uploads to: 'name' "
                                       "(in your namespace) or 'namespace/name' (default: the --output-dir folder's "
                                       "name)", HUB)

    def __post_init__(self):
        if self.output_dir is None:  # named after the model and the data, as the course names its own
            kind = "scratch" if self.init == "random" else "finetuned"
            self.output_dir = f"{short_name(self.model)}-{kind}-{short_name(self.dataset)}"

    def global_batch(self, world_size: int) -> int:
        """Chunks per optimizer step, over every micro-batch and process."""
        return self.batch_size * self.grad_accum * world_size

    def validate(self) -> None:
        """Reject settings that would fail later or silently do nothing, naming the setting."""
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise MLMError(message)

        for name in ("train_size", "test_size"):
            parse_size(getattr(self, name), name)  # raises MLMError naming the setting
        for names, valid, wanted in (  # the value `v` of each setting of `names` must be `wanted`
            (("batch_size", "eval_batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints", "top_k",
              "chunk_size"), lambda v: is_int(v) and v >= 1, "an integer >= 1"),
            (("max_steps", "eval_every", "save_every", "group_size"), lambda v: v is None or (is_int(v) and v >= 1),
             "an integer >= 1 (or left unset)"),
            (("lr",), lambda v: math.isfinite(v) and 0 < v < 1, "in (0, 1)"),
            (("weight_decay", "adam_beta1", "adam_beta2"), lambda v: 0 <= v < 1, "in [0, 1)"),
            (("warmup_steps",), lambda v: math.isfinite(v) and v >= 0 and (v < 1 or float(v).is_integer()),
             "a whole number of steps or a fraction below 1"),
            # An infinite epsilon divides every update to 0: the run would "train" without changing a weight.
            (("adam_epsilon",), lambda v: math.isfinite(v) and v > 0, "> 0 and finite"),
            (("max_grad_norm",), lambda v: v >= 0, ">= 0"),  # 0: no clipping, as the Trainer's 0
            (("mlm_probability", "wwm_probability"), lambda v: 0 < v <= 1, "in (0, 1]"),
            (("num_workers",), lambda v: v >= 0, ">= 0"),
            (("seed", "data_seed"), lambda v: is_int(v) and 0 <= v <= MAX_SEED, "an integer from 0 to 2**63 - 1"),
        ):
            for name in names:
                check(valid(getattr(self, name)), f"`{name}` must be {wanted}, got {getattr(self, name)!r}.")
        for name, spec in self.__dataclass_fields__.items():
            if (choices := spec.metadata.get("choices")) and getattr(self, name) not in choices:
                raise MLMError(f"`{name}` must be {' or '.join(choices)}, got {getattr(self, name)!r}.")
        check(not (self.lr_scheduler == "constant" and self.warmup_steps), "`lr_scheduler` constant has no warmup, "
              "but `warmup_steps` is set: use constant-with-warmup, or leave `warmup_steps` out.")
        check(self.init == "random" or not self.config_overrides, "`config_overrides` changes a randomly initialised "
              "model's config; pretrained weights fix theirs. Add `init` random, or leave the overrides out.")
        check(not (self.resume and self.overwrite), "`resume` continues a run and `overwrite` replaces it: pick one.")
        check(not (self.eval_split and self.validation_file),
              "`eval_split` and `validation_file` both name the eval data: give one of them.")
        check(self.eval_split not in self.train_splits, f"`eval_split` {self.eval_split} is also a training split: "
              "the eval chunks would be trained on. Pick another split, or leave `eval_split` out.")
        check(self.resume or not self.extend, "`extend` only applies with `resume`.")
        if self.hub_model_id is not None:  # the model card names it, pushed or not
            check_repo_id(self.hub_model_id)


def misread_settings(settings: dict) -> list[str]:
    """The names of recorded `settings` (run.json's, as JSON gives them back) whose value is not of its field's
    type: a hand-edited "lr": "2e-5" would otherwise fail deep inside a resume or mlm-evaluate."""
    hints = {**typing.get_type_hints(TrainConfig), "global_batch": int}
    return [name for name, value in settings.items() if name in hints and not _is_a(value, hints[name])]


def _is_a(value, hint) -> bool:
    """Whether the JSON `value` is of the type `hint`: a member of a union, an int for a float too, a list for a
    tuple (JSON has no tuples)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_a(value, member) for member in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list | tuple) and all(_is_a(item, typing.get_args(hint)[0]) for item in value)
    if hint in (int, float):
        return is_int(value) or (hint is float and isinstance(value, float))
    return isinstance(value, hint)


# What defines a run: a resume must keep these (--extend lets epochs and max_steps change). Everything else
# (logging, checkpoints, workers, progress bar, eval batch size, prompts, top-k, device, precision, memory
# techniques, cache) may change between segments. The global batch is compared, not its factors: splitting it
# into another batch size x accumulation x processes trains the same steps on the same masks.
RUN_SETTINGS = ("model", "tokenizer", "revision", "init", "dataset", "text_column", "chunk_size", "group_size",
                "train_size", "test_size", "train_splits", "eval_split", "validation_file", "data_seed", "masking",
                "mlm_probability", "wwm_probability", "global_batch", "lr", "weight_decay", "warmup_steps", "epochs",
                "max_steps", "max_grad_norm", "seed", "add_tokens", "lr_scheduler", "adam_beta1", "adam_beta2",
                "adam_epsilon", "config_overrides")
LENGTH_SETTINGS = ("epochs", "max_steps")
