"""The fine-tuning loop: the Hugging Face course's MLM run, written out without Trainer or accelerate.

    setup      tokenizer, model (pretrained or random), chunks, frozen eval masks, AdamW, precision
    before     perplexity and fill-mask predictions of the starting model
    each step  this rank's micro-batches (masked in the DataLoader) -> forward/backward -> clip -> AdamW -> lr
    each epoch perplexity, checkpoint
    after      fill-mask predictions, the final model in the Hub layout, a summary

Reproducibility. Epoch e visits the training chunks in the order torch.randperm(N, seed + e), as the
reference's seedable sampler does. The masks of step s in epoch e are drawn from a generator seeded with
(seed, e, s): they depend neither on DataLoader workers, nor on gradient accumulation or the number of
processes, nor on whether the run was resumed. Only dropout uses the global RNG, whose state every checkpoint
stores, so a resumed CPU run ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from mlm.checkpoint import load_config
from mlm.data import Chunks, load_chunks, split_train_test
from mlm.errors import MLMError
from mlm.evaluate import EvalResult, evaluate
from mlm.fill_mask import fill_mask
from mlm.host_memory import keep_freed_memory
from mlm.masking import MaskingCollator, freeze_eval_masks
from mlm.model import IGNORE_INDEX, DistilBertForMaskedLM
from mlm.optim import linear_schedule, make_optimizer, set_learning_rate
from mlm.tokenizer import load_tokenizer
from mlm.training_checkpoint import Progress, list_checkpoints, load_training_checkpoint, save_training_checkpoint


@dataclass
class StepResult:
    loss: torch.Tensor  # () float32 on the device: token-weighted mean loss of the whole global batch
    grad_norm: torch.Tensor  # () total L2 norm of the gradients before clipping
    skipped: bool  # the fp16 GradScaler found inf/nan gradients and skipped the update


def train_step(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    labelled_counts: list[int] | None = None,
    labelled_in_step: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = 1.0,
) -> StepResult:
    """One optimizer step over `micro_batches` (each {"input_ids", "labels"} (B, L) int64, on the device).

    Each micro-batch's mean loss is weighted by its share of the step's labelled tokens, so the gradient is
    that of the token mean over the whole global batch, whatever the split into micro-batches or processes.
    `labelled_counts` are the micro-batches' labelled-token counts (pass them when they are known on the
    host, to spare a GPU read-back) and `labelled_in_step` their total over all processes (default: over
    `micro_batches`). Under DDP, gradients are averaged over processes, so callers pass total / world_size.
    """
    device_type = micro_batches[0]["input_ids"].device.type
    counts = labelled_counts or [int((batch["labels"] != IGNORE_INDEX).sum()) for batch in micro_batches]
    total = labelled_in_step if labelled_in_step is not None else sum(counts)
    loss_sum = torch.zeros((), device=micro_batches[0]["input_ids"].device)
    for index, (batch, count) in enumerate(zip(micro_batches, counts)):
        # DDP all-reduces gradients on every backward unless told not to; only the last micro-batch needs it.
        last = index == len(micro_batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with sync:
            with autocast:
                loss = model(batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                             batch.get("label_positions")).loss
            weighted = loss * (count / max(total, 1))
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        loss_sum += weighted.detach()

    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skips the update if any gradient is inf/nan
        scaler.update()
        skipped = scaler.get_scale() < scale_before  # the scale only shrinks after a skipped step
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_sum, grad_norm=grad_norm, skipped=skipped)


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the course's (scripts/train.py --help explains each)."""

    model: str = "distilbert-base-uncased"
    tokenizer: str | None = None  # default: the model's own folder or repo
    revision: str | None = None
    init: str = "pretrained"  # "pretrained" weights, or "random" (the model's config, freshly initialised)
    dataset: str = "stanfordnlp/imdb"
    text_column: str = "text"
    chunk_size: int = 128
    group_size: int | None = None
    train_size: int = 10_000
    test_size: int = 1_000
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
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    device: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False  # rerun each block's forward in backward: less memory, ~30% slower
    keep_freed_memory: bool = True  # CPU: glibc keeps freed memory for the next step (mlm/host_memory.py)
    num_workers: int = 0
    output_dir: str = "distilbert-base-uncased-finetuned-imdb"
    log_every: int = 10
    eval_every: int | None = None  # steps; None = at the end of every epoch
    save_every: int | None = 500
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False
    prompts: tuple[str, ...] = ("This is a great [MASK].",)
    top_k: int = 5
    progress_bar: bool = True

    def validate(self) -> None:
        """Reject settings that would fail later or silently do nothing, with the flag to fix."""
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise MLMError(message)

        for name in ("batch_size", "eval_batch_size", "grad_accum", "epochs", "train_size", "test_size",
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
        check(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}.")
        check(not (self.resume and self.overwrite), "--resume continues a run and --overwrite deletes it: pick one.")


# ---------------------------------------------------------------------------------------------------------------
# Batches


def mask_seed(seed: int, epoch: int, step: int) -> int:
    """A well-mixed 63-bit seed per optimizer step, so that no two steps of a run share masks."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepBatches(torch.utils.data.Dataset):
    """Item s: this process's micro-batches of optimizer step s of one epoch, masked, on the CPU.

    The global batch of step s is order[s*G:(s+1)*G] with G = batch_size * grad_accum * world_size. It is masked
    as a whole with a generator seeded from (seed, epoch, s), then cut into micro-batches of batch_size rows, and
    process r takes micro-batches r*grad_accum … (r+1)*grad_accum - 1. Masking the whole global batch costs
    little (well under a millisecond per 64 rows) and makes the masks, hence the gradients, independent of how
    the batch is split over micro-batches and processes. The last step of an epoch may be short (the reference
    keeps the partial batch).
    """

    def __init__(self, chunks: Chunks, order: torch.Tensor, collator: MaskingCollator, *, batch_size: int,
                 grad_accum: int, rank: int, world_size: int, seed: int, epoch: int):
        self.input_ids = torch.from_numpy(chunks.input_ids.astype(np.int64))  # (N, L)
        self.word_ids = torch.from_numpy(chunks.word_ids.astype(np.int64))  # (N, L)
        self.order, self.collator = order, collator
        self.batch_size, self.grad_accum, self.rank, self.seed, self.epoch = batch_size, grad_accum, rank, seed, epoch
        self.global_batch = batch_size * grad_accum * world_size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.global_batch)

    def __getitem__(self, step: int) -> tuple[list[dict[str, torch.Tensor]], int]:
        """(this process's micro-batches, the labelled-token count of the whole global batch).

        Each micro-batch: input_ids, labels (b, L) int64 and label_positions (N,) int64, the flat indices of its
        labelled tokens. Both counts are known here on the CPU, so the step needs no read-back from the GPU and,
        under DDP, no collective to agree on the global count.
        """
        rows = self.order[step * self.global_batch : (step + 1) * self.global_batch]
        generator = torch.Generator().manual_seed(mask_seed(self.seed, self.epoch, step))
        masked = self.collator.mask(self.input_ids[rows], self.word_ids[rows], generator=generator)
        labelled = masked["labels"] != IGNORE_INDEX  # (G, L)
        batches = []
        for micro in range(self.rank * self.grad_accum, (self.rank + 1) * self.grad_accum):
            part = slice(micro * self.batch_size, (micro + 1) * self.batch_size)
            if len(rows[part]):
                batch = {name: tensor[part] for name, tensor in masked.items()}
                batch["label_positions"] = labelled[part].reshape(-1).nonzero().squeeze(1)
                batches.append(batch)
        return batches, int(labelled.sum())


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The reference's shuffling: randperm from a generator seeded seed + epoch (not the global RNG)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


# ---------------------------------------------------------------------------------------------------------------
# Devices, precision, processes


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device_choice: str) -> tuple[Processes, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), and pick this process's device."""
    procs = Processes(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    if device_choice.startswith("cuda") and not torch.cuda.is_available():
        raise MLMError("--device cuda was asked for, but torch sees no CUDA GPU. Use --device cpu.")
    device = torch.device(device_choice)
    if device.type == "cuda" and procs.world_size > 1:
        device = torch.device("cuda", procs.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if procs.world_size > 1 and not dist.is_initialized():
        # NCCL between GPUs; gloo lets the same code run (and be tested) with CPU processes.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return procs, device


def pick_precision(choice: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None, str]:
    """(autocast dtype or None for fp32, GradScaler for fp16 or None, the name of what was chosen)."""
    if choice == "auto":
        if device.type != "cuda":
            choice = "fp32"  # CPU autocast is slower than fp32 on most CPUs
        else:
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "fp32":
        return None, None, choice
    if choice == "bf16":
        return torch.bfloat16, None, choice  # bf16 has fp32's range: no loss scaling needed
    # fp16 overflows easily: scale the loss up and skip steps whose gradients overflow.
    return torch.float16, torch.amp.GradScaler(device.type), choice


# ---------------------------------------------------------------------------------------------------------------
# The output folder


RUN_FILES = ("args.json", "metrics.jsonl", "summary.json", "checkpoints", "config.json", "model.safetensors")


def prepare_output_dir(config: TrainConfig, procs: Processes) -> tuple[Path, Path | None]:
    """Return the output folder and the checkpoint to resume from; refuse to mix two runs in one folder."""
    output_dir = Path(config.output_dir).expanduser()
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    resume_from = None
    if config.resume:
        if config.resume == "latest":
            checkpoints = list_checkpoints(output_dir)
            if not checkpoints:
                raise MLMError(f"--resume latest: no checkpoint in {output_dir / 'checkpoints'}. Start a new run "
                               "without --resume, or pass a checkpoint folder.")
            resume_from = checkpoints[-1]
        else:
            resume_from = Path(config.resume).expanduser()
            if not resume_from.is_dir():
                raise MLMError(f"--resume {config.resume}: no such checkpoint folder.")
    elif existing and not config.overwrite:
        raise MLMError(f"{output_dir} already holds a run ({', '.join(existing)}). Pass --resume latest to continue "
                       "it, --overwrite to replace it, or choose another --output-dir.")
    elif existing and procs.is_main:
        for name in existing:  # only what a run writes: never a user's other files
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    if procs.world_size > 1:
        dist.barrier()  # nobody starts writing before rank 0 has cleared the folder
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir, resume_from


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed at once so that `tail -f` and crashes see every line."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, kind: str, **values) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **values}) + "\n")


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a flag the loop checks after each step (checkpoint, then exit).

    A second Ctrl-C raises KeyboardInterrupt at once, for when even that is too slow.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        tqdm.write(f"{self.signal_name} received: finishing this step, then saving a checkpoint "
                   "(Ctrl-C again to abort without saving).")


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunSummary:
    status: str  # "finished" or "interrupted"
    output_dir: str
    steps: int
    before: EvalResult | None  # None when the run was resumed (the first run measured it)
    after: EvalResult | None
    train_seconds: float
    train_tokens_per_second: float
    checkpoint: str | None  # the last checkpoint written, if any


class NonFiniteLoss(MLMError):
    pass


def train(config: TrainConfig) -> RunSummary:
    """Run the whole fine-tuning described by `config`; see the module docstring for the stages."""
    config.validate()
    procs, device = start_processes(config.device)
    if device.type == "cpu" and config.keep_freed_memory:
        keep_freed_memory()  # no per-step page faults: 10-35% faster, peak memory within a few percent
    say = tqdm.write if procs.is_main else (lambda *_: None)
    output_dir, resume_from = prepare_output_dir(config, procs)
    log = MetricsLog(output_dir / "metrics.jsonl", enabled=procs.is_main)
    autocast_dtype, scaler, precision = pick_precision(config.precision, device)
    torch.manual_seed(config.seed)  # random init and dropout; masks and shuffling have their own generators

    # -- setup: tokenizer, model, data, frozen eval masks
    tokenizer = load_tokenizer(config.tokenizer or config.model, revision=None if config.tokenizer else config.revision)
    if config.init == "pretrained":
        model = DistilBertForMaskedLM.from_pretrained(config.model, revision=config.revision)
    else:
        model = DistilBertForMaskedLM(load_config(config.model, revision=config.revision))
    if model.config.vocab_size < tokenizer.vocab_size:
        raise MLMError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}: "
                       "use the tokenizer that belongs to --model.")
    chunks = load_chunks(config.dataset, "train", tokenizer, chunk_size=config.chunk_size,
                         group_size=config.group_size, text_column=config.text_column, cache_dir=config.cache_dir,
                         max_position_embeddings=model.config.max_position_embeddings, progress=procs.is_main)
    train_chunks, test_chunks = split_train_test(chunks, train_size=config.train_size, test_size=config.test_size,
                                                 seed=config.seed)
    whole_word = config.masking == "wwm"
    collator = MaskingCollator.from_tokenizer(tokenizer, whole_word=whole_word,
                                              mlm_probability=config.mlm_probability,
                                              wwm_probability=config.wwm_probability)
    # Token-level eval targets whatever the training masking, so every run is scored on the same tokens.
    eval_set = freeze_eval_masks(test_chunks.input_ids, mask_token_id=tokenizer.mask_token_id,
                                 vocab_size=tokenizer.vocab_size, special_token_ids=tokenizer.special_token_ids,
                                 seed=config.seed, mlm_probability=config.mlm_probability)
    eval_shard = {k: v[procs.rank :: procs.world_size] for k, v in eval_set.items()}

    model.distilbert.gradient_checkpointing = config.gradient_checkpointing
    model.to(device)
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    global_batch = config.batch_size * config.grad_accum * procs.world_size
    steps_per_epoch = math.ceil(len(train_chunks) / global_batch)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = round(config.warmup_steps * total_steps) if config.warmup_steps < 1 else int(config.warmup_steps)

    progress = Progress()
    if resume_from is not None:
        progress = load_training_checkpoint(resume_from, model=model, optimizer=optimizer, scaler=scaler)
        say(f"Resuming from {resume_from} (epoch {progress.epoch + 1}, step {progress.global_step}/{total_steps}).")
    if procs.rank > 0:
        # Checkpoints hold rank 0's RNG state; other processes need dropout streams of their own.
        torch.manual_seed(mask_seed(config.seed + procs.rank, progress.epoch, progress.global_step))
    train_model: nn.Module = model
    if procs.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)

    def run_eval(label: str) -> EvalResult:
        result = evaluate(model, eval_shard["input_ids"], eval_shard["labels"], batch_size=config.eval_batch_size,
                          autocast_dtype=autocast_dtype, all_reduce=_all_reduce if procs.world_size > 1 else None)
        log.write("eval", label=label, step=progress.global_step, epoch=progress.epoch, **asdict(result))
        say(f"[{label}] step {progress.global_step}: perplexity {result.perplexity:.3f} "
            f"(reference-style {result.reference_perplexity:.3f}), loss {result.loss:.4f}, "
            f"masked-token accuracy {result.accuracy:.2%}")
        return result

    def run_fill_mask(label: str) -> None:
        if not procs.is_main or not config.prompts:
            return
        for prompt, per_mask in zip(config.prompts, fill_mask(model, tokenizer, list(config.prompts), config.top_k)):
            tokens = [[(p.token, round(p.score, 4)) for p in predictions] for predictions in per_mask]
            log.write("fill_mask", label=label, step=progress.global_step, prompt=prompt, predictions=tokens)
            say(f"[{label}] {prompt} -> " + " | ".join(", ".join(f"{t} {s:.3f}" for t, s in m) for m in tokens))

    if procs.is_main:
        args = {**asdict(config), "precision_used": precision, "device_used": str(device),
                "world_size": procs.world_size, "train_chunks": len(train_chunks), "eval_chunks": len(test_chunks),
                "eval_tokens": int((eval_set["labels"] != IGNORE_INDEX).sum()), "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "warmup_steps_used": warmup, "parameters": model.num_parameters()}
        (output_dir / ("args.json" if resume_from is None else f"args-resume-{progress.global_step}.json")).write_text(
            json.dumps(args, indent=2) + "\n")
        say(f"{model.num_parameters():,} parameters on {device} ({precision}); {len(train_chunks):,} train / "
            f"{len(test_chunks):,} eval chunks of {config.chunk_size}; {total_steps} steps of {global_batch} chunks.")

    before = None
    if resume_from is None:
        before = run_eval("before")
        run_fill_mask("before")

    # -- the loop
    last_checkpoint = str(resume_from) if resume_from else None
    after = None
    tokens_done, train_seconds = 0, 0.0

    def checkpoint() -> None:
        nonlocal last_checkpoint
        if procs.is_main:
            last_checkpoint = str(save_training_checkpoint(
                output_dir, model=model, optimizer=optimizer, scaler=scaler, progress=progress,
                tokenizer=tokenizer, keep_last=config.keep_checkpoints))
        if procs.world_size > 1:
            dist.barrier()

    bar = tqdm(total=total_steps, initial=progress.global_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (procs.is_main and config.progress_bar))
    loss_since_log = torch.zeros((), device=device)
    steps_since_log, log_clock, tokens_since_log = 0, time.perf_counter(), 0
    with StopRequest() as stop:
        stopping = False
        while progress.global_step < total_steps and not stopping:
            epoch = progress.epoch
            batches = StepBatches(train_chunks, epoch_order(len(train_chunks), config.seed, epoch), collator,
                                  batch_size=config.batch_size, grad_accum=config.grad_accum, rank=procs.rank,
                                  world_size=procs.world_size, seed=config.seed, epoch=epoch)
            loader = torch.utils.data.DataLoader(
                batches, batch_size=None, sampler=range(progress.step_in_epoch, len(batches)),
                num_workers=config.num_workers, pin_memory=device.type == "cuda",
                # Its own generator: creating an iterator must not draw from the global RNG (dropout's).
                generator=torch.Generator().manual_seed(config.seed),
            )
            for micro_cpu, labelled_in_global_batch in loader:
                step_start = time.perf_counter()
                counts = [len(b["label_positions"]) for b in micro_cpu]
                # DDP averages gradients over processes, so each process weighs by total / world_size.
                labelled = labelled_in_global_batch / procs.world_size
                micro = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_cpu]
                if config.compile:  # the labelled count changes every step: compile for any count from the start
                    for b in micro:
                        torch._dynamo.mark_dynamic(b["label_positions"], 0)
                lr = config.lr * linear_schedule(progress.schedule_step, warmup_steps=warmup, total_steps=total_steps)
                set_learning_rate(optimizer, lr)
                result = train_step(train_model, micro, optimizer, labelled_counts=counts, labelled_in_step=labelled,
                                    scaler=scaler, autocast_dtype=autocast_dtype, max_grad_norm=config.max_grad_norm)
                progress.global_step += 1
                progress.step_in_epoch += 1
                progress.schedule_step += 0 if result.skipped else 1
                step_tokens = sum(b["input_ids"].numel() for b in micro_cpu) * procs.world_size
                tokens_done += step_tokens
                tokens_since_log += step_tokens
                loss_since_log += result.loss
                steps_since_log += 1
                bar.update(1)

                finished = progress.global_step >= total_steps
                epoch_end = progress.step_in_epoch >= len(batches)
                stopping = _any_process(stop.signal_name is not None, procs, device)
                if steps_since_log >= config.log_every or finished or epoch_end or stopping:
                    # The only host read-back of the loss: once per log interval, not per step.
                    mean_loss = _check_finite(loss_since_log, steps_since_log, procs, progress, last_checkpoint)
                    elapsed = time.perf_counter() - log_clock
                    log.write("train", step=progress.global_step, epoch=epoch + progress.step_in_epoch / len(batches),
                              loss=mean_loss, lr=lr, grad_norm=float(result.grad_norm),
                              tokens_per_second=tokens_since_log / elapsed, skipped=result.skipped)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_since_log / elapsed:,.0f}")
                    loss_since_log.zero_()
                    steps_since_log, log_clock, tokens_since_log = 0, time.perf_counter(), 0
                train_seconds += time.perf_counter() - step_start

                if epoch_end:
                    progress.epoch, progress.step_in_epoch = epoch + 1, 0
                if config.eval_every and progress.global_step % config.eval_every == 0 and not epoch_end:
                    after = run_eval(f"step {progress.global_step}")
                if epoch_end or finished:
                    after = run_eval(f"epoch {epoch + 1}" if epoch_end else "final")
                if epoch_end or finished or stopping or (
                        config.save_every and progress.global_step % config.save_every == 0):
                    checkpoint()
                if finished or stopping:
                    break
    bar.close()

    status = "interrupted" if stopping else "finished"
    if status == "finished":
        run_fill_mask("after")
        if procs.is_main:
            model.save_pretrained(output_dir, tokenizer=tokenizer)
    summary = RunSummary(status=status, output_dir=str(output_dir), steps=progress.global_step, before=before,
                         after=after, train_seconds=train_seconds,
                         train_tokens_per_second=tokens_done / train_seconds if train_seconds else 0.0,
                         checkpoint=last_checkpoint)
    if procs.is_main:
        (output_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    if procs.world_size > 1:
        dist.destroy_process_group()
    return summary


def _any_process(flag: bool, procs: Processes, device: torch.device) -> bool:
    """True if `flag` is set in any process: a signal reaches processes at different steps, but all must stop
    (and checkpoint) at the same one, or the others would wait forever in the next all-reduce."""
    if procs.world_size == 1:
        return flag
    return bool(_all_reduce(torch.tensor([float(flag)], device=device)).item())


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(values)
    return values


def _check_finite(loss_sum: torch.Tensor, steps: int, procs: Processes, progress: Progress, checkpoint) -> float:
    """Mean loss since the last log (averaged over processes); stop the run if it is NaN or infinite."""
    if procs.world_size > 1:
        loss_sum = _all_reduce(loss_sum.detach().clone()) / procs.world_size
    mean = loss_sum.item() / steps
    if not math.isfinite(mean):
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        raise NonFiniteLoss(f"The training loss became {mean} by step {progress.global_step}; stopping without saving "
                            f"the damaged weights ({where}). Try a lower --lr, --precision bf16 or fp32, or warmup.")
    return mean
