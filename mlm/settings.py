"""The settings of a training run: `TrainConfig`, with the course's defaults, and which of them define a run.

Both the training loop (mlm/train.py) and the run layer (mlm/run/) read these; keeping them in a module of their
own lets the run layer record and compare settings without importing the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlm.chunks import parse_size
from mlm.errors import MLMError

REPORT_TO = ("none", "tensorboard")

@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the course's (scripts/train.py --help explains each)."""

    model: str = "distilbert-base-uncased"
    tokenizer: str | None = None  # default: the model's own folder or repo
    revision: str | None = None
    init: str = "pretrained"  # "pretrained" weights, or "random" (the model's config, freshly initialised)
    dataset: str = "stanfordnlp/imdb"
    text_column: str = "text"
    train_splits: tuple[str, ...] = ("train",)  # concatenated, e.g. ("train", "unsupervised")
    eval_split: str | None = None  # eval chunks from this split (e.g. "test"), not held out of the train chunks
    validation_file: str | None = None  # or from this file
    chunk_size: int = 128
    group_size: int | None = None
    train_size: int | str = 10_000  # or "all": every chunk not held out
    test_size: int | str = 1_000  # or a percentage such as "5%"
    cache_dir: str | None = None
    masking: str = "token"  # "token" (80/10/10) or "wwm" (whole words)
    mlm_probability: float = 0.15
    wwm_probability: float = 0.2
    batch_size: int = 64  # per process and micro-batch; global batch = batch_size * grad_accum * processes
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: float = 0  # steps, or a fraction of all steps when below 1 (as the reference)
    epochs: int = 3
    max_steps: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 42  # init, shuffling, training masks, dropout
    data_seed: int = 42  # the train/eval draw and the frozen eval masks: the same targets whatever --seed
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    device: str = "auto"
    compile: bool = False
    # off | on | auto: compile with CUDA graphs, so a step's kernels replay without per-kernel launches; auto: on one
    # GPU for runs long enough to repay the compile (mlm/speed/compiled.py choose_path)
    cuda_graphs: str = "auto"
    gradient_checkpointing: bool = False  # rerun each block's forward in backward: less memory, slower steps
    lean: str = "auto"  # mlm/speed/lean.py's techniques: auto (on the CPU only) | on | off
    keep_freed_memory: bool = True  # CPU: glibc keeps freed memory for the next step (mlm/speed/host_memory.py)
    num_workers: int = 0
    output_dir: str = "distilbert-base-uncased-finetuned-imdb"
    log_every: int = 10
    eval_every: int | None = None  # steps; None = at the end of every epoch
    save_every: int | None = 500
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    extend: bool = False  # with resume: --epochs / --max-steps may differ from the run's (the schedule follows)
    overwrite: bool = False
    prompts: tuple[str, ...] = ("This is a great [MASK].",)
    top_k: int = 5
    progress_bar: bool = True
    report_to: str = "none"  # "tensorboard": also write the metrics as TensorBoard scalars (mlm/run/tensorboard_log.py)
    push_to_hub: bool = False  # the CLI pushes the finished folder; train() only writes the model card
    hub_model_id: str | None = None  # the repo the model card names (default: the output folder)
    hub_private: bool | None = None

    def __post_init__(self):
        if isinstance(self.cuda_graphs, bool):  # the former on/off switch: True meant on
            self.cuda_graphs = "on" if self.cuda_graphs else "off"

    def validate(self) -> None:
        """Reject settings that would fail later or silently do nothing, with the flag to fix."""
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise MLMError(message)

        for name in ("train_size", "test_size"):
            parse_size(getattr(self, name), f"--{name.replace('_', '-')}")  # raises MLMError naming the flag
        for name in ("batch_size", "eval_batch_size", "grad_accum", "epochs",
                     "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"--{name.replace('_', '-')} must be an integer >= 1, "
                                                          f"got {value!r}.")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1 (or left unset), got {value}.")
        check(math.isfinite(self.lr) and 0 < self.lr < 1, f"--lr must be in (0, 1), got {self.lr}.")
        check(0 <= self.weight_decay < 1, f"--weight-decay must be in [0, 1), got {self.weight_decay}.")
        check(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}.")
        check(self.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {self.max_grad_norm}.")
        check(0 < self.mlm_probability <= 1, f"--mlm-probability must be in (0, 1], got {self.mlm_probability}.")
        check(0 < self.wwm_probability <= 1, f"--wwm-probability must be in (0, 1], got {self.wwm_probability}.")
        check(self.masking in ("token", "wwm"), f"--masking must be 'token' or 'wwm', got {self.masking!r}.")
        check(self.init in ("pretrained", "random"), f"--init must be 'pretrained' or 'random', got {self.init!r}.")
        check(self.precision in ("auto", "fp32", "fp16", "bf16"),
              f"--precision must be auto, fp32, fp16 or bf16, got {self.precision!r}.")
        check(self.lean in ("auto", "on", "off"), f"--lean must be auto, on or off, got {self.lean!r}.")
        check(self.cuda_graphs in ("off", "on", "auto"),
              f"--cuda-graphs must be off, on or auto, got {self.cuda_graphs!r}.")
        # Where --cuda-graphs on cannot run is mlm/speed/compiled.py choose_path's to say (it knows the device too).
        check(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}.")
        check(isinstance(self.top_k, int) and self.top_k >= 1, f"--top-k must be an integer >= 1, got {self.top_k!r}.")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            check(isinstance(value, int) and 0 <= value <= MAX_SEED,
                  f"--{name.replace('_', '-')} must be an integer from 0 to 2**63 - 1, got {value!r}.")
        check(not (self.resume and self.overwrite), "--resume continues a run and --overwrite deletes it: pick one.")
        check(not (self.eval_split and self.validation_file),
              "--eval-split and --validation-file both name the eval data: pass one of them.")
        check(self.eval_split not in self.train_splits, f"--eval-split {self.eval_split} is also a training split: "
              "the eval chunks would be trained on. Pick another split, or leave --eval-split out.")
        check(self.report_to in REPORT_TO, f"--report-to must be {' or '.join(REPORT_TO)}, got {self.report_to!r}.")
        check(self.resume or not self.extend, "--extend only applies with --resume.")


MAX_SEED = 2**63 - 1  # seeds are offset by the epoch and fed to torch and numpy generators, which take 64 bits
# What defines a run: a resume must keep these (--extend lets epochs and max_steps change). Everything else
# (logging, checkpoints, workers, progress bar, eval batch size, prompts, top-k, device, precision, memory
# techniques, cache) may change between segments. The global batch is compared, not its factors: splitting it
# into another batch size x accumulation x processes trains the same steps on the same masks.
RUN_SETTINGS = ("model", "tokenizer", "revision", "init", "dataset", "text_column", "chunk_size", "group_size",
                "train_size", "test_size", "train_splits", "eval_split", "validation_file", "data_seed", "masking",
                "mlm_probability", "wwm_probability", "global_batch", "lr", "weight_decay", "warmup_steps", "epochs",
                "max_steps", "max_grad_norm", "seed")
LENGTH_SETTINGS = ("epochs", "max_steps")
