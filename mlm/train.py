"""The fine-tuning loop: the Hugging Face course's MLM run, written out without Trainer or accelerate.

Read top to bottom: `train` (the whole run), `fit` (the loop), `train_step`, the batches, then how the model, the
data and the optimizer are set up; the settings are `TrainConfig` (mlm/settings.py). The run layer (mlm/run/session.py)
keeps the folder, the record, the logs and the checkpoints, and decides itself when each is due; the execution path
(mlm/speed/path.py) wraps the model, the step and the tokenizer for the device, chosen once at set-up.

    setup      tokenizer, model (pretrained or random), chunks, frozen eval masks, AdamW and its schedule
    before     perplexity and fill-mask predictions of the starting model
    each step  the lr, this process's micro-batches (masked on the CPU) -> forward/backward -> clip -> AdamW
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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from mlm.corpus import Chunks, load_train_eval_chunks, unused_validation_split
from mlm.evaluate import EvalResult, check_masked_tokens, score_batches, summarize
from mlm.files.pretrained import load_model
from mlm.fill_mask import check_prompts, fill_mask
from mlm.masking import IGNORE_INDEX, MaskingCollator, freeze_eval_masks
from mlm.optim import Schedule, lr_schedule, make_optimizer, set_learning_rate
from mlm.run.session import Processes, Run, RunSummary, ignore_stop_signals, open_run
from mlm.settings import TrainConfig
from mlm.speed.path import ExecutionPath, choose_path
from mlm.tokenizer import Tokenizer, load_tokenizer
from mlm.vocabulary import added_words, added_words_notes, extend_vocabulary

__all__ = ["RunSummary", "StepBatches", "StepResult", "TrainConfig", "train", "train_step"]


def train(config: TrainConfig) -> RunSummary:
    """Run the whole fine-tuning described by `config`; see the module docstring for the stages."""
    config.validate()
    with open_run(config) as run:  # the folder locked; Ctrl-C, SIGTERM, SIGHUP stop cleanly from here on
        if run.already_finished:
            return run.nothing_to_do()
        setup = set_up(config, run.procs, run.added_tokens)  # every input built and checked; nothing written yet
        run.start(setup.model, setup.optimizer, setup.path.precision.scaler, setup.tokenizer, path=setup.path.says,
                  precision=setup.path.precision.name, facts=setup.facts(), notes=setup.notes(config))
        if run.is_new:
            run.record_eval("before", evaluate_on(setup, config, run))
            run.record_fill_mask("before", *predict(setup, config, run.procs))
        elif label := run.eval_missed():  # a stop saved before it (or a resume --extend'ed to end here): now
            run.record_eval(label, evaluate_on(setup, config, run))
        if not fit(run, setup, config):
            return run.stopped()
        run.record_fill_mask("after", *predict(setup, config, run.procs))
        return run.finish()


def fit(run: Run, setup: Setup, config: TrainConfig) -> bool:
    """The loop: one optimizer step per global batch, to the schedule's last step. False if a signal stopped it
    (after a checkpoint)."""
    progress, procs = run.progress, run.procs
    with run.signals.deferred():  # a signal now lets the step finish and the checkpoint be written
        while progress.global_step < setup.schedule.total_steps:
            batches = StepBatches(setup.train_chunks, epoch_order(len(setup.train_chunks), config.seed, progress.epoch),
                                  setup.collator, batch_size=config.batch_size, grad_accum=config.grad_accum,
                                  rank=procs.rank, world_size=procs.world_size, seed=config.seed, epoch=progress.epoch)
            steps_left = setup.schedule.total_steps - progress.global_step  # --max-steps may end a run mid-epoch
            for micro_batches, labelled, rows in make_loader(batches, progress.step_in_epoch, steps_left, config):
                lr = setup.learning_rate(progress.schedule_step)  # the schedule at the steps that ran (mlm/optim.py)
                set_learning_rate(setup.optimizer, lr)
                # DDP averages gradients over processes, so each process weighs its share by total / world_size.
                result = setup.step(micro_batches, labelled_in_step=labelled / procs.world_size)
                progress.advance(ran=result.ran, steps_in_epoch=len(batches))
                run.after_step(result.loss, result.grad_norm, ran=result.ran, lr=lr, labelled=labelled,
                               tokens=rows * setup.train_chunks.chunk_size)  # logs when due, notes a stop request
                if (label := run.eval_due()) and not run.stop_requested:  # a stop saves first; the resume scores
                    run.record_eval(label, evaluate_on(setup, config, run))
                run.save_if_due()  # every --save-every steps, at each epoch's end, at the last step, on a stop
                if run.stop_requested:
                    return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepResult:
    # () float32 on the device: this process's share of the global batch's token-weighted mean loss (its
    # micro-batches weighted by their labelled tokens over the global count); the sum over processes is the mean.
    loss: torch.Tensor
    grad_norm: torch.Tensor  # () total L2 norm of the gradients before clipping
    # 1 if AdamW updated the weights; under fp16 a () int64 device tensor (unread, so no wait for the GPU), 0 when
    # the scaler skipped the update for inf/nan gradients
    ran: int | torch.Tensor


def train_step(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    labelled_in_step: float,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = 1.0,
) -> StepResult:
    """One optimizer step over `micro_batches` (each {"input_ids", "labels"} (B, L) int64, on the host).

    Each micro-batch's mean loss is weighted by its share of the step's labelled tokens, `labelled_in_step` (under
    DDP, which averages gradients over processes, the global count / world_size), so the gradient is that of the
    token mean over the whole global batch, whatever the split into micro-batches or processes. The learning rate
    is the caller's to set before the step.
    """
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        # DDP all-reduces gradients on every backward unless told not to; only the last micro-batch needs it.
        last = index == len(micro_batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with sync:
            with autocast:
                loss = model(**batch).loss
            weighted = loss * ((batch["labels"] != IGNORE_INDEX).sum() / max(labelled_in_step, 1))
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        loss_sum += weighted.detach()

    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    # Without a limit, an infinite one: the same total norm, and gradients scaled by exactly 1.
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or math.inf)
    ran = 1
    if scaler is not None:
        # As the reference (accelerate): a step after which the scale went down was skipped for inf/nan gradients.
        # scaler.scale(1) is the scale as a device tensor, so nothing here waits for the GPU.
        one = torch.ones((), device=device)
        scale = scaler.scale(one)
        scaler.step(optimizer)  # AdamW skips its update when a gradient is inf or nan ...
        scaler.update()  # ... and then the scaler halves its scale
        ran = (scaler.scale(one) >= scale).long()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_sum, grad_norm=grad_norm, ran=ran)


# ---------------------------------------------------------------------------------------------------------------
# Batches


def mask_seed(seed: int, epoch: int, step: int) -> int:
    """A well-mixed 63-bit seed per optimizer step, so that no two steps of a run share masks."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepBatch(NamedTuple):
    micro_batches: list[dict[str, torch.Tensor]]  # this process's, each {"input_ids", "labels"} (b, L) int64
    labelled: int  # labelled tokens in the whole global batch, every process's micro-batches together
    rows: int  # chunks in the global batch


class StepBatches(torch.utils.data.Dataset):
    """Item s: this process's micro-batches of optimizer step s of one epoch, masked, on the CPU (a StepBatch).

    The global batch of step s is order[s*G:(s+1)*G] with G = batch_size * grad_accum * world_size. It is masked
    as a whole with a generator seeded from (seed, epoch, s), then cut into micro-batches of batch_size rows, and
    process r takes micro-batches r*grad_accum … (r+1)*grad_accum - 1. Masking the whole global batch makes the
    masks, hence the gradients, independent of how the batch is split over micro-batches and processes. The last
    step of an epoch may be short (the reference keeps the partial batch). Its counts are known here, on the CPU, so
    the step needs no read-back from the GPU and, under DDP, no collective to agree on the global count.
    """

    def __init__(self, chunks: Chunks, order: torch.Tensor, collator: MaskingCollator, *, batch_size: int,
                 grad_accum: int, rank: int, world_size: int, seed: int, epoch: int):
        self.chunks = chunks  # read by row in __getitem__: a memory-mapped store is never copied whole
        self.order, self.collator = order, collator
        self.batch_size, self.grad_accum, self.rank, self.seed, self.epoch = batch_size, grad_accum, rank, seed, epoch
        self.global_batch = batch_size * grad_accum * world_size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.global_batch)

    def __getitem__(self, step: int) -> StepBatch:
        rows = self.order[step * self.global_batch : (step + 1) * self.global_batch]
        generator = torch.Generator().manual_seed(mask_seed(self.seed, self.epoch, step))
        input_ids, word_ids = (torch.from_numpy(a.astype(np.int64)) for a in self.chunks.rows(rows.numpy()))  # (G, L)
        masked = self.collator.mask(input_ids, word_ids, generator=generator)
        mine = [slice(micro * self.batch_size, (micro + 1) * self.batch_size)
                for micro in range(self.rank * self.grad_accum, (self.rank + 1) * self.grad_accum)]
        batches = [{name: tensor[part] for name, tensor in masked.items()} for part in mine if len(rows[part])]
        if not batches:
            # An epoch's short last batch can leave this process no rows. It still has to take part in the step,
            # or the other processes wait for its gradients forever: it runs one row with no label, which adds
            # nothing to the loss or the gradients.
            batches = [{"input_ids": input_ids[:1], "labels": torch.full_like(input_ids[:1], IGNORE_INDEX)}]
        return StepBatch(batches, int((masked["labels"] != IGNORE_INDEX).sum()), len(rows))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The reference's shuffling: randperm from a generator seeded seed + epoch (not the global RNG)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def make_loader(batches: StepBatches, first_step: int, steps_left: int,
                config: TrainConfig) -> torch.utils.data.DataLoader:
    """The epoch's steps from `first_step` on (at most `steps_left`), masked in `num_workers` worker processes."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(first_step, min(len(batches), first_step + steps_left)),
        num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
        # Its own generator: creating an iterator must not draw from the global RNG (dropout's).
        generator=torch.Generator().manual_seed(config.seed),
        worker_init_fn=ignore_stop_signals,  # a stop signal is the main process's to act on (mlm/run/signals.py)
    )


# ---------------------------------------------------------------------------------------------------------------
# Setup: the model, the data, the optimizer


@dataclass
class Setup:
    """Everything the loop needs, built and checked before the run writes anything."""

    path: ExecutionPath  # device, precision, and the wrappers chosen for them (mlm/speed/path.py)
    tokenizer: Tokenizer
    model: nn.Module  # the model of mlm/model.py (lean modules swapped in on the CPU): fill-mask and saving use it
    train_chunks: Chunks
    eval_set: dict[str, torch.Tensor]  # the frozen eval set: {"input_ids", "labels"} (N, L) int64
    eval_model: nn.Module  # what evaluation calls: `model`, or it compiled
    collator: MaskingCollator
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    learning_rate: Callable  # schedule step -> lr; under fp16 looked up on the device (mlm/speed/path.py)
    step: Callable[..., StepResult]  # train_step on this run's model (DDP, compiled or graphed) and optimizer

    def notes(self, config: TrainConfig) -> list[str]:
        """What the user should know before the run spends its time: a default draw that leaves most of their corpus
        unused, a precision that is slow on their device."""
        notes = list(self.path.notes)
        drawn, available, whose = len(self.train_chunks), self.train_chunks.drawn_from, "of the training data"
        if config.eval_split is None and config.validation_file is None:
            available -= len(self.eval_set["input_ids"])  # held out of the same chunks, as the course does
            whose = "the eval set leaves"
        if drawn < available / 2:
            share = f"{drawn / available:.0%}" if drawn >= available / 100 else "under 1%"
            notes.append(f"training on {drawn:,} of the {available:,} chunks {whose} ({share}, "
                         f"--train-size {config.train_size}); --train-size all trains on all of them.")
        validation = unused_validation_split(config.dataset, train_splits=config.train_splits,
                                             eval_split=config.eval_split, validation_file=config.validation_file)
        return notes + ([validation] if validation else []) + added_words_notes(self.tokenizer, config.add_tokens)

    def facts(self) -> dict:
        """What the settings gave, for the run record."""
        return {"train_chunks": len(self.train_chunks), "eval_chunks": len(self.eval_set["input_ids"]),
                "eval_tokens": int((self.eval_set["labels"] != IGNORE_INDEX).sum()),
                "global_batch": self.schedule.global_batch, "steps_per_epoch": self.schedule.steps_per_epoch,
                "total_steps": self.schedule.total_steps, "warmup_steps": self.schedule.warmup_steps,
                "parameters": self.model.num_parameters(),
                # With `add_tokens` every perplexity of the run is on this extended tokenization (docs/base-models.md)
                **({"added_tokens": words} if (words := added_words(self.tokenizer)) else {})}


def set_up(config: TrainConfig, procs: Processes, added_tokens: list[str] | None = None) -> Setup:
    """Tokenizer, model, data and frozen eval masks, optimizer and schedule, wrapped by the execution path.
    `added_tokens`: the words a resumed run added to its tokenizer (`add_tokens`), from its record."""
    torch.manual_seed(config.seed)  # random init and dropout; masks and shuffling have their own generators
    tokenizer = load_tokenizer(config.tokenizer or config.model, revision=None if config.tokenizer else config.revision)
    model = load_model(config.model, init=config.init, revision=config.revision, tokenizer=tokenizer,
                       config_overrides=config.config_overrides)
    tokenizer, model = extend_vocabulary(config, tokenizer, model, added_tokens)  # `add_tokens`: new tokens
    model.distilbert.gradient_checkpointing = config.gradient_checkpointing
    check_prompts(tokenizer, list(config.prompts), top_k=config.top_k,
                  max_length=model.config.max_length)  # used at the end: checked now
    path = choose_path(config, procs)
    train_chunks, eval_set = load_data(config, path.tokenizer(tokenizer), model)
    collator = MaskingCollator.from_tokenizer(tokenizer, whole_word=config.masking == "wwm",
                                              mlm_probability=config.mlm_probability,
                                              wwm_probability=config.wwm_probability)
    schedule = Schedule.of(len(train_chunks), global_batch=config.global_batch(procs.world_size), epochs=config.epochs,
                           max_steps=config.max_steps, warmup_steps=config.warmup_steps)
    path = path.for_steps(schedule.total_steps)  # CUDA graphs only pay for themselves over a long enough run
    model = path.model(model)  # on the device; lean modules on the CPU
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                               betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    learning_rate = path.learning_rate(lr_schedule(config.lr, warmup_steps=schedule.warmup_steps,
                                                   total_steps=schedule.total_steps, kind=config.lr_scheduler),
                                       schedule.total_steps)
    step, eval_model = path.training(train_step, model, optimizer, max_grad_norm=config.max_grad_norm)
    return Setup(path, tokenizer, model, train_chunks, eval_set, eval_model, collator, optimizer, schedule,
                 learning_rate, step)


def load_data(config: TrainConfig, tokenizer: Tokenizer, model: nn.Module) -> tuple[Chunks, dict[str, torch.Tensor]]:
    """(the training chunks, the eval chunks masked once: {"input_ids", "labels"} (N, L) int64)."""
    train_chunks, test_chunks = load_train_eval_chunks(
        config.dataset, tokenizer, train_splits=config.train_splits, eval_split=config.eval_split,
        validation_file=config.validation_file, train_size=config.train_size, test_size=config.test_size,
        seed=config.data_seed, chunk_size=config.chunk_size, group_size=config.group_size,
        text_column=config.text_column, cache_dir=config.cache_dir,
        max_length=model.config.max_length, progress=config.progress_bar)
    # Token-level eval targets whatever the training masking, so every run is scored on the same tokens.
    eval_set = freeze_eval_masks(test_chunks.input_ids, mask_token_id=tokenizer.mask_token_id,
                                 vocab_size=tokenizer.vocab_size, special_token_ids=tokenizer.special_token_ids,
                                 seed=config.data_seed, mlm_probability=config.mlm_probability)
    check_masked_tokens(int((eval_set["labels"] != IGNORE_INDEX).sum()))  # refused now, not at the first eval
    return train_chunks, eval_set


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and fill-mask during the run


def evaluate_on(setup: Setup, config: TrainConfig, run: Run) -> EvalResult:
    """Perplexity on the frozen eval set. Under torchrun each process scores every world_size-th eval batch, and the
    batches' figures are summed in batch order, as one process sums them: the same figures for any process count."""
    input_ids, labels, procs = setup.eval_set["input_ids"], setup.eval_set["labels"], run.procs
    batches = run.console.over(range(procs.rank, math.ceil(len(input_ids) / config.eval_batch_size),
                                     procs.world_size), "eval")
    scores = score_batches(setup.eval_model, input_ids, labels, batch_size=config.eval_batch_size,
                           autocast_dtype=setup.path.precision.autocast_dtype, batches=batches)
    return summarize(procs.gather_interleaved(scores))


def predict(setup: Setup, config: TrainConfig, procs: Processes) -> tuple[list[str], list]:
    """(prompts, their top-k predictions per [MASK]): the main process's job."""
    prompts = list(config.prompts) if procs.is_main else []
    return prompts, fill_mask(setup.model, setup.tokenizer, prompts, config.top_k) if prompts else []
