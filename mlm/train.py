"""The fine-tuning loop: the Hugging Face course's MLM run, written out without Trainer or accelerate.

Read top to bottom: `train` (the whole run), `fit` (the loop), `train_step`, the batches, the schedule, then
how the model and the data are built; the settings are `TrainConfig` (mlm/settings.py). Folders, the run record,
checkpoints, logs and signals are the run layer's (mlm/run/session.py), called at a few named points.

    setup      tokenizer, model (pretrained or random), chunks, frozen eval masks, AdamW, precision
    before     perplexity and fill-mask predictions of the starting model
    each step  the lr, this rank's micro-batches (masked on the CPU) -> forward/backward -> clip -> AdamW
    each epoch perplexity, checkpoint
    after      fill-mask predictions, the final model in the Hub layout, the finished run record

Reproducibility. Epoch e visits the training chunks in the order torch.randperm(N, seed + e), as the
reference's seedable sampler does. The masks of step s in epoch e are drawn from a generator seeded with
(seed, e, s): they depend neither on DataLoader workers, nor on gradient accumulation or the number of
processes, nor on whether the run was resumed. Only dropout uses the global RNG, whose state (every process's)
every checkpoint stores, so a resumed run ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from mlm.data import Chunks, load_train_eval_chunks
from mlm.errors import MLMError
from mlm.evaluate import EvalResult, evaluate
from mlm.files.pretrained import load_config, load_pretrained
from mlm.fill_mask import check_prompts, fill_mask
from mlm.masking import MaskingCollator, freeze_eval_masks
from mlm.model import IGNORE_INDEX, DistilBertForMaskedLM
from mlm.optim import make_optimizer
from mlm.run.processes import Precision, Processes, all_reduce_sum, pick_precision, start_processes
from mlm.run.session import Run, RunSummary, open_run
from mlm.settings import TrainConfig
from mlm.speed.amp import LearningRate, scaler_step
from mlm.speed.compiled import ExecutionPath, eval_path, move_to_device, pad_positions, path_for, wrap_for_training
from mlm.speed.host_memory import keep_freed_memory
from mlm.speed.lean import make_lean
from mlm.tokenizer import Tokenizer, load_tokenizer

__all__ = ["RunSummary", "StepBatches", "StepResult", "TrainConfig", "train", "train_step"]


def train(config: TrainConfig) -> RunSummary:
    """Run the whole fine-tuning described by `config`; see the module docstring for the stages."""
    config.validate()
    procs, device = start_processes(config.device)
    with open_run(config, procs, device) as run:  # the folder locked; Ctrl-C, SIGTERM, SIGHUP stop cleanly
        if run.already_finished:
            return run.nothing_to_do()
        setup = set_up(config, procs, device)  # every input built and checked; nothing written yet
        schedule = setup.schedule
        run.restore(setup.model, setup.optimizer, setup.precision.scaler, tokenizer=setup.tokenizer,
                    global_batch=schedule.global_batch, total_steps=schedule.total_steps)
        run.begin(model=setup.model, optimizer=setup.optimizer, scaler=setup.precision.scaler,
                  tokenizer=setup.tokenizer, precision=setup.precision.name, model_variant=setup.model_variant,
                  derived=setup.facts())
        if run.is_new:
            run.record_eval("before", evaluate_on(setup, config, procs))
            run.record_fill_mask("before", *predict(setup, config, procs))
        if fit(run, setup, config, procs, device):
            return run.stopped()
        if run.last_eval() is None:  # a resume --extend'ed to end where it stands: no eval at this step yet
            run.record_eval("final", evaluate_on(setup, config, procs))
        run.record_fill_mask("after", *predict(setup, config, procs))
        return run.finish()


def fit(run: Run, setup: Setup, config: TrainConfig, procs: Processes, device: torch.device) -> bool:
    """The loop: one optimizer step per global batch; evals and checkpoints at epoch ends. True if a signal
    stopped it (after saving a checkpoint)."""
    progress, schedule, precision, graphs = run.progress, setup.schedule, setup.precision, setup.path.graphs
    # The lr of each step: a host float, or under fp16 a device tensor (mlm/speed/amp.py: no host read per step).
    learning_rate = LearningRate(setup.optimizer, progress, config.lr, schedule, on_device=bool(precision.scaler))
    with run.signals.deferred():  # a signal now lets the step finish and the checkpoint be written
        while progress.global_step < schedule.total_steps:
            epoch = progress.epoch
            batches = StepBatches(setup.train_chunks, epoch_order(len(setup.train_chunks), config.seed, epoch),
                                  setup.collator, batch_size=config.batch_size, grad_accum=config.grad_accum,
                                  rank=procs.rank, world_size=procs.world_size, seed=config.seed, epoch=epoch,
                                  pad_positions_to=setup.path.padding)
            for micro_cpu, labelled_in_global_batch, rows in make_loader(batches, progress.step_in_epoch, config,
                                                                          device):
                lr = learning_rate.next()  # lr * linear_schedule(steps that ran), set in AdamW (mlm/optim.py)
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be reused now
                micro = move_to_device(micro_cpu, device, compiled=setup.path.compile)
                # DDP averages gradients over processes, so each process weighs by total / world_size.
                result = train_step(setup.train_model, micro, setup.optimizer,
                                    labelled_counts=[int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_cpu],
                                    labelled_in_step=labelled_in_global_batch / procs.world_size,
                                    scaler=precision.scaler, autocast_dtype=precision.autocast_dtype,
                                    max_grad_norm=config.max_grad_norm)
                learning_rate.done(result.skipped)
                advance(progress, steps_in_epoch=len(batches))
                finished, epoch_end = progress.global_step >= schedule.total_steps, progress.step_in_epoch == 0
                stop = run.after_step(loss=result.loss, grad_norm=result.grad_norm, skipped=result.skipped, lr=lr,
                                      tokens=rows * setup.train_chunks.chunk_size,
                                      epoch=progress.epoch + progress.step_in_epoch / len(batches),
                                      log_now=finished or epoch_end)
                if config.eval_every and progress.global_step % config.eval_every == 0 and not (epoch_end or finished):
                    run.record_eval(f"step {progress.global_step}", evaluate_on(setup, config, procs))
                if epoch_end or finished:
                    run.record_eval(f"epoch {epoch + 1}" if epoch_end else "final", evaluate_on(setup, config, procs))
                periodic_save = config.save_every and progress.global_step % config.save_every == 0
                if epoch_end or finished or stop or periodic_save:
                    learning_rate.sync()  # progress.schedule_step exact in the checkpoint
                    run.save_checkpoint()
                if finished or stop:
                    return stop
    return False


def advance(progress, *, steps_in_epoch: int) -> None:
    """One optimizer step done (the schedule's own count, of the steps that ran, is LearningRate's)."""
    progress.global_step += 1
    progress.step_in_epoch += 1
    if progress.step_in_epoch == steps_in_epoch:
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepResult:
    # () float32 on the device: this process's share of the global batch's token-weighted mean loss (its
    # micro-batches weighted by their labelled tokens over the global count); the sum over processes is the mean.
    loss: torch.Tensor
    grad_norm: torch.Tensor  # () total L2 norm of the gradients before clipping
    skipped: bool | torch.Tensor  # inf/nan fp16 gradients: update skipped; fp16: () 1.0/0.0 on the device, unread


def train_step(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    labelled_counts: list[int] | None = None,
    labelled_in_step: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = 1.0,
) -> StepResult:
    """One optimizer step over `micro_batches` (each {"input_ids", "labels"} (B, L) int64, on the device).

    Each micro-batch's mean loss is weighted by its share of the step's labelled tokens, so the gradient is
    that of the token mean over the whole global batch, whatever the split into micro-batches or processes.
    `labelled_counts` are the micro-batches' labelled-token counts (pass them when they are known on the
    host, to spare a GPU read-back) and `labelled_in_step` their total over all processes (default: over
    `micro_batches`). Under DDP, gradients are averaged over processes, so callers pass total / world_size (a
    float). The learning rate is the caller's to set before the step.
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
    # Without a limit, an infinite one: the same total norm, and gradients scaled by exactly 1.
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or math.inf)
    skipped = False
    if scaler is not None:
        skipped = scaler_step(scaler, optimizer)  # AdamW skips the update if any gradient is inf/nan
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_sum, grad_norm=grad_norm, skipped=skipped)


# ---------------------------------------------------------------------------------------------------------------
# Batches


def mask_seed(seed: int, epoch: int, step: int) -> int:
    """A well-mixed 63-bit seed per optimizer step, so that no two steps of a run share masks."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepBatches(torch.utils.data.Dataset):
    """Item s: this process's micro-batches of optimizer step s of one epoch, masked, on the CPU.

    The global batch of step s is order[s*G:(s+1)*G] with G = batch_size * grad_accum * world_size. It is masked
    as a whole with a generator seeded from (seed, epoch, s), then cut into micro-batches of batch_size rows, and
    process r takes micro-batches r*grad_accum … (r+1)*grad_accum - 1. Masking the whole global batch makes the
    masks, hence the gradients, independent of how the batch is split over micro-batches and processes. The last
    step of an epoch may be short (the reference keeps the partial batch).
    """

    def __init__(self, chunks: Chunks, order: torch.Tensor, collator: MaskingCollator, *, batch_size: int,
                 grad_accum: int, rank: int, world_size: int, seed: int, epoch: int, pad_positions_to: int = 1):
        self.chunks = chunks  # read by row in __getitem__: a memory-mapped store is never copied whole
        self.order, self.collator = order, collator
        self.batch_size, self.grad_accum, self.rank, self.seed, self.epoch = batch_size, grad_accum, rank, seed, epoch
        self.global_batch = batch_size * grad_accum * world_size
        self.pad_positions_to = pad_positions_to

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.global_batch)

    def __getitem__(self, step: int) -> tuple[list[dict[str, torch.Tensor]], int, int]:
        """(this process's micro-batches, the labelled-token count of the whole global batch, its rows).

        Each micro-batch: input_ids, labels (b, L) int64 and label_positions (N,) int64, the flat indices of its
        labelled tokens (padded to a multiple of `pad_positions_to`, see pad_positions). Both counts are known here
        on the CPU, so the step needs no read-back from the GPU and, under DDP, no collective to agree on the
        global count.
        """
        rows = self.order[step * self.global_batch : (step + 1) * self.global_batch]
        generator = torch.Generator().manual_seed(mask_seed(self.seed, self.epoch, step))
        input_ids, word_ids = (torch.from_numpy(a.astype(np.int64)) for a in self.chunks.rows(rows.numpy()))  # (G, L)
        masked = self.collator.mask(input_ids, word_ids, generator=generator)
        labelled = masked["labels"] != IGNORE_INDEX  # (G, L)
        batches = []
        for micro in range(self.rank * self.grad_accum, (self.rank + 1) * self.grad_accum):
            part = slice(micro * self.batch_size, (micro + 1) * self.batch_size)
            if len(rows[part]):
                batch = {name: tensor[part] for name, tensor in masked.items()}
                batch["label_positions"] = pad_positions(labelled[part].reshape(-1), self.pad_positions_to)
                batches.append(batch)
        if not batches:
            # An epoch's short last batch can leave this process no rows. It still has to take part in the step,
            # or the other processes wait for its gradients forever: it runs one row with no label, which adds
            # nothing to the loss or the gradients.
            batch = {"input_ids": masked["input_ids"][:1],
                     "labels": torch.full_like(masked["labels"][:1], IGNORE_INDEX)}
            batch["label_positions"] = pad_positions(torch.zeros(batch["labels"].numel(), dtype=torch.bool),
                                                     self.pad_positions_to)
            batches.append(batch)
        return batches, int(labelled.sum()), len(rows)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The reference's shuffling: randperm from a generator seeded seed + epoch (not the global RNG)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def make_loader(batches: StepBatches, first_step: int, config: TrainConfig,
                device: torch.device) -> torch.utils.data.DataLoader:
    """The epoch's steps from `first_step` on, masked in `num_workers` worker processes."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(first_step, len(batches)),
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
        # Its own generator: creating an iterator must not draw from the global RNG (dropout's).
        generator=torch.Generator().manual_seed(config.seed),
    )


# ---------------------------------------------------------------------------------------------------------------
# The schedule


@dataclass
class Schedule:
    global_batch: int  # chunks per optimizer step, over all micro-batches and processes
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, config: TrainConfig, train_chunks: int, world_size: int) -> Schedule:
        global_batch = config.batch_size * config.grad_accum * world_size
        steps_per_epoch = math.ceil(train_chunks / global_batch)
        total = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        warmup = round(config.warmup_steps * total) if config.warmup_steps < 1 else int(config.warmup_steps)
        if warmup >= total:
            raise MLMError(f"--warmup-steps {config.warmup_steps:g} gives {warmup} warmup steps, but the run has only "
                           f"{total}: the learning rate would never reach --lr. Use fewer warmup steps (or a "
                           "fraction below 1).")
        return cls(global_batch, steps_per_epoch, total, warmup)


# ---------------------------------------------------------------------------------------------------------------
# Setup: the model, the data, the optimizer


@dataclass
class Setup:
    """Everything the loop needs, built and checked before the run writes anything."""

    precision: Precision
    tokenizer: Tokenizer
    model: DistilBertForMaskedLM
    model_variant: str  # which model runs, and why (the run's first lines say it)
    train_chunks: Chunks
    eval_set: dict[str, torch.Tensor]  # the frozen eval set: {"input_ids", "labels"} (N, L) int64
    eval_shard: dict[str, torch.Tensor]  # this process's rows of it
    collator: MaskingCollator
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    path: ExecutionPath  # eager, compiled, or CUDA graphs (mlm/speed/compiled.py choose_path)
    train_model: nn.Module  # what the steps call: `model`, or it wrapped in DDP / compiled (wrap_for_training)

    def facts(self) -> dict:
        """What the settings gave, for the run record."""
        return {"train_chunks": len(self.train_chunks), "eval_chunks": len(self.eval_set["input_ids"]),
                "eval_tokens": int((self.eval_set["labels"] != IGNORE_INDEX).sum()),
                "global_batch": self.schedule.global_batch, "steps_per_epoch": self.schedule.steps_per_epoch,
                "total_steps": self.schedule.total_steps, "warmup_steps": self.schedule.warmup_steps,
                "parameters": self.model.num_parameters()}


def set_up(config: TrainConfig, procs: Processes, device: torch.device) -> Setup:
    """Tokenizer, model, data and frozen eval masks, optimizer and schedule."""
    if device.type == "cpu" and config.keep_freed_memory:
        keep_freed_memory()  # no page faults per step (docs/performance.md, "CPU runs keep freed memory")
    precision = pick_precision(config.precision, device)
    torch.manual_seed(config.seed)  # random init and dropout; masks and shuffling have their own generators
    tokenizer = load_tokenizer(config.tokenizer or config.model, revision=None if config.tokenizer else config.revision)
    model, variant = build_model(config, tokenizer, device)
    check_prompts(tokenizer, list(config.prompts), top_k=config.top_k,
                  max_length=model.config.max_position_embeddings)  # used at the end: checked now
    train_chunks, eval_set = load_data(config, tokenizer, model)
    collator = MaskingCollator.from_tokenizer(tokenizer, whole_word=config.masking == "wwm",
                                              mlm_probability=config.mlm_probability,
                                              wwm_probability=config.wwm_probability)
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    schedule = Schedule.of(config, len(train_chunks), procs.world_size)
    eval_shard = {k: v[procs.rank :: procs.world_size] for k, v in eval_set.items()}
    path = path_for(config, device.type, procs.world_size, schedule.total_steps)  # eager, compiled or CUDA graphs
    return Setup(precision, tokenizer, model, f"{variant}; steps run {path.says}", train_chunks, eval_set, eval_shard,
                 collator, optimizer, schedule, path, wrap_for_training(model, path, procs.world_size, device))


def build_model(config: TrainConfig, tokenizer: Tokenizer,
                device: torch.device) -> tuple[DistilBertForMaskedLM, str]:
    """The pretrained model, or a random one of the model's config, on `device`; and which variant runs."""
    if config.init == "pretrained":
        model = load_pretrained(config.model, revision=config.revision)
    else:
        model = DistilBertForMaskedLM(load_config(config.model, revision=config.revision))
    if model.config.vocab_size < tokenizer.vocab_size:
        raise MLMError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}: "
                       "use the tokenizer that belongs to --model.")
    model.distilbert.gradient_checkpointing = config.gradient_checkpointing
    variant = f"the plain model of mlm/model.py (--lean {config.lean}{' on a GPU' if config.lean == 'auto' else ''})"
    # mlm/speed/lean.py's modules save memory and time on the CPU; on a GPU the plain model's SDPA kernels do.
    if config.lean == "on" or (config.lean == "auto" and device.type == "cpu"):
        make_lean(model)  # same parameters, same values computed
        why = "--lean auto: the default on a CPU" if config.lean == "auto" else "--lean on"
        variant = f"mlm/model.py with mlm/speed/lean.py's memory-saving modules ({why}; --lean off runs the plain one)"
    return model.to(device), variant


def load_data(config: TrainConfig, tokenizer: Tokenizer,
              model: DistilBertForMaskedLM) -> tuple[Chunks, dict[str, torch.Tensor]]:
    """(the training chunks, the eval chunks masked once: {"input_ids", "labels"} (N, L) int64)."""
    train_chunks, test_chunks = load_train_eval_chunks(
        config.dataset, tokenizer, train_splits=config.train_splits, eval_split=config.eval_split,
        validation_file=config.validation_file, train_size=config.train_size, test_size=config.test_size,
        seed=config.data_seed, chunk_size=config.chunk_size, group_size=config.group_size,
        text_column=config.text_column, cache_dir=config.cache_dir,
        max_position_embeddings=model.config.max_position_embeddings, progress=config.progress_bar)
    # Token-level eval targets whatever the training masking, so every run is scored on the same tokens.
    eval_set = freeze_eval_masks(test_chunks.input_ids, mask_token_id=tokenizer.mask_token_id,
                                 vocab_size=tokenizer.vocab_size, special_token_ids=tokenizer.special_token_ids,
                                 seed=config.data_seed, mlm_probability=config.mlm_probability)
    return train_chunks, eval_set


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and fill-mask during the run


def evaluate_on(setup: Setup, config: TrainConfig, procs: Processes) -> EvalResult:
    """Perplexity on the frozen eval set, each process scoring its shard, reduced over processes."""
    all_reduce = partial(all_reduce_sum, procs=procs) if procs.world_size > 1 else None
    return evaluate(setup.model, setup.eval_shard["input_ids"], setup.eval_shard["labels"],
                    batch_size=config.eval_batch_size, autocast_dtype=setup.precision.autocast_dtype,
                    all_reduce=all_reduce, **eval_path(setup.train_model, setup.path, procs.world_size))


def predict(setup: Setup, config: TrainConfig, procs: Processes) -> tuple[list[str], list]:
    """(prompts, their top-k predictions per [MASK]): the main process's job."""
    prompts = list(config.prompts) if procs.is_main else []
    return prompts, fill_mask(setup.model, setup.tokenizer, prompts, config.top_k) if prompts else []
