"""The fine-tuning loop: the Hugging Face course's MLM run, written out without Trainer or accelerate.

Read top to bottom: the settings (`TrainConfig`), the run (`train`, whose story is `train_in`: `set_up`, then
`start_run`, then the loop), one optimizer step (`train_step`), the batches (`StepBatches`), then small helpers.
Processes, devices, precision, the metrics log and Ctrl-C handling are in mlm/run/processes.py; the output folder
(lock, --overwrite, clean-up) in mlm/run/folder.py.

    setup      tokenizer, model (pretrained or random), chunks, frozen eval masks, AdamW, precision
    before     perplexity and fill-mask predictions of the starting model
    each step  this rank's micro-batches (masked on the CPU) -> forward/backward -> clip -> AdamW -> lr
    each epoch perplexity, checkpoint
    after      fill-mask predictions, the final model in the Hub layout, a summary

Reproducibility. Epoch e visits the training chunks in the order torch.randperm(N, seed + e), as the
reference's seedable sampler does. The masks of step s in epoch e are drawn from a generator seeded with
(seed, e, s): they depend neither on DataLoader workers, nor on gradient accumulation or the number of
processes, nor on whether the run was resumed. Only dropout uses the global RNG, whose state every checkpoint
stores, so a resumed CPU run ends with the same weights, bit for bit, as an uninterrupted one.

Nothing lost, nothing mixed. The output folder is locked before setup (mlm/run/folder.py), and nothing in it is
touched until setup has succeeded: every flag, the model, tokenizer, data, prompts and, on resume, the stored
settings and the checkpoint's checksums are checked first. A resume refuses any change to RUN_SETTINGS.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mlm.data import Chunks, load_train_eval_chunks
from mlm.errors import MLMError
from mlm.evaluate import EvalResult, evaluate
from mlm.files.pretrained import load_config, load_pretrained, save_pretrained
from mlm.fill_mask import check_prompts, fill_mask
from mlm.masking import MaskingCollator, freeze_eval_masks
from mlm.model import IGNORE_INDEX, DistilBertForMaskedLM
from mlm.optim import linear_schedule, make_optimizer, set_learning_rate
from mlm.run.checkpoints import (
    CheckpointError,
    Progress,
    checkpoint_step,
    list_checkpoints,
    load_training_checkpoint,
    newest_good_checkpoint,
    read_state,
    save_training_checkpoint,
    verify_checkpoint,
)
from mlm.run.folder import RunFolder
from mlm.run.model_card import write_run_model_card
from mlm.run.processes import (
    MetricsLog,
    Precision,
    Processes,
    StopRequest,
    all_reduce_sum,
    any_process,
    barrier,
    end_processes,
    pick_precision,
    start_processes,
)
from mlm.run.tensorboard_log import TensorBoardLog, require_tensorboard
from mlm.settings import LENGTH_SETTINGS, RUN_SETTINGS, TrainConfig
from mlm.speed.host_memory import keep_freed_memory
from mlm.speed.lean import make_lean
from mlm.tokenizer import Tokenizer, load_tokenizer

# Label positions are padded to a multiple of this with --cuda-graphs (see pad_positions).
CUDA_GRAPH_PADDING = 256

# ---------------------------------------------------------------------------------------------------------------
# Settings




@dataclass
class RunSummary:
    status: str  # "finished" or "interrupted"
    output_dir: str
    steps: int
    before: EvalResult | None  # the starting model's, measured by the run's first segment
    after: EvalResult | None
    train_seconds: float  # over all segments of the run
    train_tokens_per_second: float
    checkpoint: str | None  # the last checkpoint written, if any


# ---------------------------------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig) -> RunSummary:
    """Run the whole fine-tuning described by `config`; see the module docstring for the stages."""
    config.validate()
    if config.report_to == "tensorboard":
        require_tensorboard()  # a missing package stops the run here, before the output folder is touched
    procs, device = start_processes(config.device)
    if config.cuda_graphs and (device.type != "cuda" or procs.world_size > 1):
        raise MLMError("--cuda-graphs needs one process on a CUDA GPU: drop it, or run on a GPU without torchrun.")
    folder = RunFolder.lock(config.output_dir, is_main=procs.is_main)  # a second run on the folder stops here
    try:
        return train_in(folder, config, procs, device)
    except BaseException:
        folder.abandon()  # before the first checkpoint: the folder goes back to how it was
        raise
    finally:
        folder.release()


def train_in(folder: RunFolder, config: TrainConfig, procs: Processes, device: torch.device) -> RunSummary:
    """train() once the output folder is locked: setup (nothing written yet), then the run."""
    setup = set_up(folder, config, procs, device)  # tokenizer, model, data, optimizer, schedule: all checked
    run = start_run(folder, setup, config, procs, device)  # only now is the output folder written to
    optimizer, precision, progress, schedule = run.optimizer, run.precision, run.progress, run.schedule
    if setup.resume_from is None:
        progress.before = asdict(evaluate_and_log(run, "before"))  # kept in checkpoints for summary.json
        fill_mask_and_log(run, "before")
    before = EvalResult(**progress.before) if progress.before else None
    train_chunks, collator = setup.train_chunks, setup.collator

    # The loop: one optimizer step per global batch, logs every few steps, evals and checkpoints at boundaries.
    train_model = wrap_for_training(run.model, config, procs, device)
    meter = Meter(device, seconds=progress.train_seconds, tokens=progress.train_tokens)
    bar = tqdm(total=schedule.total_steps, initial=progress.global_step, desc="train", unit="step",
               dynamic_ncols=True, disable=not (procs.is_main and config.progress_bar))
    after, stopping = None, False
    with StopRequest() as stop:
        while progress.global_step < schedule.total_steps and not stopping:
            epoch = progress.epoch
            batches = StepBatches(train_chunks, epoch_order(len(train_chunks), config.seed, epoch), collator,
                                  batch_size=config.batch_size, grad_accum=config.grad_accum, rank=procs.rank,
                                  world_size=procs.world_size, seed=config.seed, epoch=epoch,
                                  pad_positions_to=CUDA_GRAPH_PADDING if config.cuda_graphs else 1)
            for micro_cpu, labelled_in_global_batch in make_loader(batches, progress, config, device):
                lr = config.lr * linear_schedule(progress.schedule_step, warmup_steps=schedule.warmup_steps,
                                                 total_steps=schedule.total_steps)
                set_learning_rate(optimizer, lr)
                micro = move_to_device(micro_cpu, device, compiled=config.compile and not config.cuda_graphs)
                if config.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be reused now
                # DDP averages gradients over processes, so each process weighs by total / world_size.
                result = train_step(train_model, micro, optimizer,
                                    labelled_counts=[int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_cpu],
                                    labelled_in_step=labelled_in_global_batch / procs.world_size,
                                    scaler=precision.scaler, autocast_dtype=precision.autocast_dtype,
                                    max_grad_norm=config.max_grad_norm)
                advance(progress, skipped=result.skipped)
                meter.add(result.loss, sum(b["input_ids"].numel() for b in micro_cpu) * procs.world_size)
                bar.update(1)

                finished = progress.global_step >= schedule.total_steps
                epoch_end = progress.step_in_epoch >= len(batches)
                log_due = meter.steps >= config.log_every or finished or epoch_end
                # Every process reaches the same log steps, so they agree there on a stop request (a host sync
                # under DDP, hence not at every step) and all stop, and checkpoint, at the same step.
                if log_due or procs.world_size == 1:
                    stopping = any_process(stop.requested, procs, device)
                if log_due or stopping:
                    log_training(run, meter, bar, epoch + progress.step_in_epoch / len(batches), lr, result)
                if epoch_end:
                    progress.epoch, progress.step_in_epoch = epoch + 1, 0
                if config.eval_every and progress.global_step % config.eval_every == 0 and not epoch_end:
                    after = evaluate_and_log(run, f"step {progress.global_step}")
                if epoch_end or finished:
                    after = evaluate_and_log(run, f"epoch {epoch + 1}" if epoch_end else "final")
                if epoch_end or finished or stopping or (
                        config.save_every and progress.global_step % config.save_every == 0):
                    save_checkpoint(run, meter)
                meter.restart_clock()  # the next interval's tokens/s counts training only, not evals or saves
                if finished or stopping:
                    break
    bar.close()
    return finish(run, meter, before=before, after=after, interrupted=stopping)


@dataclass
class Setup:
    """Everything a run needs, built and checked before its output folder is touched."""

    resume_from: Path | None
    precision: Precision
    tokenizer: Tokenizer
    model: DistilBertForMaskedLM
    train_chunks: Chunks
    eval_set: dict[str, torch.Tensor]  # the frozen eval set: {"input_ids", "labels"} (N, L) int64
    collator: MaskingCollator
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    progress: Progress
    changed: dict  # harmless settings changed by a resume: {name: [before, now]}


def set_up(folder: RunFolder, config: TrainConfig, procs: Processes, device: torch.device) -> Setup:
    """Tokenizer, model, data and frozen eval masks, optimizer and schedule; on resume the checkpoint and its
    settings. Any failure here leaves the output folder as it was."""
    if device.type == "cpu" and config.keep_freed_memory:
        keep_freed_memory()  # no page faults per step (README, "CPU runs keep freed memory")
    resume_from = folder.resume_point(config.resume, config.overwrite)
    precision = pick_precision(config.precision, device)
    torch.manual_seed(config.seed)  # random init and dropout; masks and shuffling have their own generators
    tokenizer = load_tokenizer(config.tokenizer or config.model, revision=None if config.tokenizer else config.revision)
    model = build_model(config, tokenizer, device)
    check_prompts(tokenizer, list(config.prompts), top_k=config.top_k,
                  max_length=model.config.max_position_embeddings)  # used at the end: checked now
    train_chunks, eval_set = load_data(config, tokenizer, model)
    collator = MaskingCollator.from_tokenizer(tokenizer, whole_word=config.masking == "wwm",
                                              mlm_probability=config.mlm_probability,
                                              wwm_probability=config.wwm_probability)
    optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    schedule = Schedule.of(config, len(train_chunks), procs.world_size)
    changed = check_resume_settings(resume_from, config, schedule)
    progress = resume(resume_from, model, optimizer, precision, procs, config.seed)
    if resume_from is not None and progress.global_step > schedule.total_steps:
        raise MLMError(f"{resume_from} is at step {progress.global_step}, past the {schedule.total_steps} steps "
                       "of --epochs/--max-steps: with --extend, give at least as many.")
    return Setup(resume_from, precision, tokenizer, model, train_chunks, eval_set, collator, optimizer, schedule,
                 progress, changed)


def start_run(folder: RunFolder, setup: Setup, config: TrainConfig, procs: Processes, device: torch.device) -> Run:
    """Make the output folder ready (the old run aside with --overwrite, later checkpoints gone on resume), open
    the metrics log and announce the run."""
    resume_from, progress = setup.resume_from, setup.progress
    notes = folder.start(overwrite=config.overwrite, resume_from=resume_from)
    output_dir = folder.path
    if resume_from is not None:
        progress.segment += 1
        notes += discard_later_checkpoints(output_dir, resume_from) if procs.is_main else []
    barrier(procs)  # nobody writes before rank 0 has made the folder ready
    run = Run(config, procs, device, setup.precision, output_dir, setup.model, setup.tokenizer, setup.optimizer,
              progress, eval_shard={k: v[procs.rank :: procs.world_size] for k, v in setup.eval_set.items()},
              log=MetricsLog(output_dir / "metrics.jsonl", enabled=procs.is_main, segment=progress.segment,
                             listeners=report_listeners(config, output_dir) if procs.is_main else ()),
              last_checkpoint=str(resume_from) if resume_from else None, folder=folder, schedule=setup.schedule)
    for note in notes:
        run.say(f"note: {note}")
    announce(run, setup.schedule, resume_from, setup.train_chunks, setup.eval_set, setup.changed)
    return run


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step


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
                 grad_accum: int, rank: int, world_size: int, seed: int, epoch: int, pad_positions_to: int = 1):
        self.chunks = chunks  # read by row in __getitem__: a memory-mapped store is never copied whole
        self.order, self.collator = order, collator
        self.batch_size, self.grad_accum, self.rank, self.seed, self.epoch = batch_size, grad_accum, rank, seed, epoch
        self.global_batch = batch_size * grad_accum * world_size
        self.pad_positions_to = pad_positions_to

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.global_batch)

    def __getitem__(self, step: int) -> tuple[list[dict[str, torch.Tensor]], int]:
        """(this process's micro-batches, the labelled-token count of the whole global batch).

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
        return batches, int(labelled.sum())


def pad_positions(labelled: torch.Tensor, multiple: int) -> torch.Tensor:
    """The flat indices of the True entries of `labelled` (M,) bool, padded to a multiple of `multiple` by
    repeating the first unlabelled index (whose label, -100, adds no loss): with CUDA graphs, every distinct
    length is another recorded graph, and a multiple of 256 leaves one or two lengths in a run."""
    positions = labelled.nonzero().squeeze(1)  # (N,)
    missing = -len(positions) % multiple
    unlabelled = (~labelled).nonzero()
    if missing == 0 or len(unlabelled) == 0:
        return positions
    return torch.cat([positions, unlabelled[0].expand(missing)])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The reference's shuffling: randperm from a generator seeded seed + epoch (not the global RNG)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


# ---------------------------------------------------------------------------------------------------------------
# Helpers of train(), in the order it calls them


def build_model(config: TrainConfig, tokenizer: Tokenizer, device: torch.device) -> DistilBertForMaskedLM:
    """The pretrained model, or a random one of the model's config, lean where that pays off, on `device`."""
    if config.init == "pretrained":
        model = load_pretrained(config.model, revision=config.revision)
    else:
        model = DistilBertForMaskedLM(load_config(config.model, revision=config.revision))
    if model.config.vocab_size < tokenizer.vocab_size:
        raise MLMError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}: "
                       "use the tokenizer that belongs to --model.")
    model.distilbert.gradient_checkpointing = config.gradient_checkpointing
    # mlm/speed/lean.py's techniques pay off on the CPU; on a GPU the plain model's SDPA kernels already do their job.
    if config.lean == "on" or (config.lean == "auto" and device.type == "cpu"):
        make_lean(model)
    return model.to(device)


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


def report_listeners(config: TrainConfig, output_dir: Path) -> tuple:
    """What receives the metrics besides metrics.jsonl (--report-to)."""
    return (TensorBoardLog(output_dir),) if config.report_to == "tensorboard" else ()


def check_resume_settings(resume_from: Path | None, config: TrainConfig, schedule: Schedule) -> dict:
    """Refuse a resume whose settings would change the run (RUN_SETTINGS), listing every difference; return the
    harmless changes {name: [before, now]} for the record. Also checks the checkpoint's files (checksums)."""
    if resume_from is None:
        return {}
    verified_or_refused(resume_from)
    stored = read_state(resume_from).get("settings")
    args_file = resume_from.parent.parent / "args.json"
    if stored is None and args_file.is_file():  # a checkpoint of an older mlm: its run's args.json
        try:
            stored = json.loads(args_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MLMError(f"{args_file} is unreadable ({err}): cannot check the resumed run's settings.") from None
        if not isinstance(stored, dict):
            raise MLMError(f"{args_file} does not hold a JSON object: cannot check the resumed run's settings.")
        stored = {"data_seed": stored.get("seed"), **stored}  # the data seed was the seed then
        stored["global_batch"] = (stored.get("batch_size", 0) * stored.get("grad_accum", 1)
                                  * stored.get("world_size", 1))
    if stored is None:
        tqdm.write(f"note: {resume_from} records no settings: resuming without checking them.")
        return {}
    current = run_settings(config, schedule)
    differ = [name for name in RUN_SETTINGS if name in stored and _differs(stored[name], current[name])]
    if config.extend:
        differ = [name for name in differ if name not in LENGTH_SETTINGS]
    if differ:
        def flag(name: str) -> str:
            return ("the global batch (--batch-size x --grad-accum x processes)" if name == "global_batch"
                    else f"--{name.replace('_', '-')}")
        listed = "; ".join(f"{flag(name)} {stored[name]!r} -> {current[name]!r}" for name in differ)
        hint = (" To train for longer (or shorter), add --extend." if set(differ) & set(LENGTH_SETTINGS) else "")
        raise MLMError(f"--resume would change the run in {resume_from.parent.parent}: {listed}. Resume with the "
                       f"run's settings (its args.json lists them), or start a new run in another --output-dir.{hint}")
    ignored = set(RUN_SETTINGS) | {"resume", "overwrite", "extend"}
    return {name: [stored[name], value] for name, value in current.items()
            if name not in ignored and name in stored and _differs(stored[name], value)}


def run_settings(config: TrainConfig, schedule: Schedule) -> dict:
    """The settings a checkpoint stores (JSON-able): every field of `config`, and the global batch."""
    return {**json.loads(json.dumps(asdict(config))), "global_batch": schedule.global_batch}


def _differs(stored, current) -> bool:
    return json.loads(json.dumps(stored)) != json.loads(json.dumps(current))  # tuples and lists alike


def verified_or_refused(checkpoint: Path) -> None:
    """Check `checkpoint`'s files against its manifest; refuse it naming the newest good checkpoint."""
    try:
        verify_checkpoint(checkpoint)
        read_state(checkpoint)
    except CheckpointError as err:
        raise bad_checkpoint(checkpoint, err) from None


def bad_checkpoint(checkpoint: Path, err: Exception) -> MLMError:
    good = newest_good_checkpoint(checkpoint.parent.parent, before_step=checkpoint_step(checkpoint))
    fix = (f"the newest good checkpoint is {good}: resume with --resume {good}" if good
           else "no older checkpoint of the run is intact: start again with --overwrite")
    return MLMError(f"Not resuming from a damaged checkpoint: {err} {fix}, or restore {checkpoint.name} from a copy.")


def discard_later_checkpoints(output_dir: Path, resume_from: Path) -> list[str]:
    """Resuming from an older checkpoint of this folder redoes the steps after it: the checkpoints of those steps
    belong to the abandoned course, and would pass as the new one's. Return a note for each removed."""
    step = checkpoint_step(resume_from)
    if resume_from.resolve().parent != (output_dir / "checkpoints").resolve():
        return []
    notes = []
    for later in list_checkpoints(output_dir):
        if checkpoint_step(later) > step:
            shutil.rmtree(later)
            notes.append(f"removed {later.name}: it follows {resume_from.name}, whose later steps run again now.")
    return notes


def resume(resume_from: Path | None, model: DistilBertForMaskedLM, optimizer: torch.optim.Optimizer,
           precision: Precision, procs: Processes, seed: int) -> Progress:
    """Where the run starts: step 0, or the checkpoint's position with weights, optimizer and RNG restored."""
    progress = Progress()
    if resume_from is not None:
        try:
            progress = load_training_checkpoint(resume_from, model=model, optimizer=optimizer,
                                                scaler=precision.scaler)
        except CheckpointError as err:  # e.g. non-finite weights, which no checksum catches
            raise bad_checkpoint(resume_from, err) from None
    if procs.rank > 0:
        # Checkpoints hold rank 0's RNG state; other processes need dropout streams of their own.
        torch.manual_seed(mask_seed(seed + procs.rank, progress.epoch, progress.global_step))
    return progress


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


@dataclass
class Run:
    """What the helpers below share about the run in progress."""

    config: TrainConfig
    procs: Processes
    device: torch.device
    precision: Precision
    output_dir: Path
    model: DistilBertForMaskedLM
    tokenizer: Tokenizer
    optimizer: torch.optim.Optimizer
    progress: Progress
    eval_shard: dict[str, torch.Tensor] = field(repr=False)  # this process's share of the frozen eval set
    log: MetricsLog
    last_checkpoint: str | None  # the newest checkpoint written or resumed from
    folder: RunFolder
    schedule: Schedule

    def say(self, message: str) -> None:
        if self.procs.is_main:
            tqdm.write(message)


def announce(run: Run, schedule: Schedule, resume_from: Path | None, train_chunks: Chunks,
             eval_set: dict[str, torch.Tensor], changed: dict) -> None:
    """args.json: the settings and what was derived from them (rewritten by a resume, which may change only
    harmless settings, or the length with --extend); a `resume` line in metrics.jsonl; a one-line summary."""
    config, model, procs = run.config, run.model, run.procs
    if resume_from is not None:
        run.say(f"Resuming from {resume_from} (epoch {run.progress.epoch + 1}, step {run.progress.global_step}/"
                f"{schedule.total_steps}).")
    if not procs.is_main:
        return
    eval_chunks = len(eval_set["input_ids"])
    args = {**asdict(config), "precision_used": run.precision.name, "device_used": str(run.device),
            "world_size": procs.world_size, "train_chunks": len(train_chunks), "eval_chunks": eval_chunks,
            "eval_tokens": int((eval_set["labels"] != IGNORE_INDEX).sum()),
            "steps_per_epoch": schedule.steps_per_epoch, "total_steps": schedule.total_steps,
            "warmup_steps_used": schedule.warmup_steps, "parameters": model.num_parameters()}
    (run.output_dir / "args.json").write_text(json.dumps(args, indent=2) + "\n")
    if resume_from is not None:
        # Lines of the earlier segments with a larger step were replayed: this segment's supersede them.
        run.log.write("resume", step=run.progress.global_step, checkpoint=str(resume_from), changed=changed)
    run.say(f"{model.num_parameters():,} parameters on {run.device} ({run.precision.name}); {len(train_chunks):,} "
            f"train / {eval_chunks:,} eval chunks of {config.chunk_size}; {schedule.total_steps} steps of "
            f"{schedule.global_batch} chunks.")


def evaluate_and_log(run: Run, label: str) -> EvalResult:
    """Perplexity on the frozen eval set (reduced over processes), logged and printed."""
    all_reduce = partial(all_reduce_sum, procs=run.procs) if run.procs.world_size > 1 else None
    result = evaluate(run.model, run.eval_shard["input_ids"], run.eval_shard["labels"],
                      batch_size=run.config.eval_batch_size, autocast_dtype=run.precision.autocast_dtype,
                      all_reduce=all_reduce)
    run.log.write("eval", label=label, step=run.progress.global_step, epoch=run.progress.epoch, **asdict(result))
    run.say(f"[{label}] step {run.progress.global_step}: perplexity {result.perplexity:.3f} "
            f"(reference-style {result.reference_perplexity:.3f}), loss {result.loss:.4f}, "
            f"masked-token accuracy {result.accuracy:.2%}")
    return result


def fill_mask_and_log(run: Run, label: str) -> None:
    """The top-k predictions for each prompt (main process only)."""
    prompts = list(run.config.prompts)
    if not run.procs.is_main or not prompts:
        return
    for prompt, per_mask in zip(prompts, fill_mask(run.model, run.tokenizer, prompts, run.config.top_k)):
        tokens = [[(p.token, round(p.score, 4)) for p in predictions] for predictions in per_mask]
        run.log.write("fill_mask", label=label, step=run.progress.global_step, prompt=prompt, predictions=tokens)
        run.say(f"[{label}] {prompt} -> " + " | ".join(", ".join(f"{t} {s:.3f}" for t, s in m) for m in tokens))


def wrap_for_training(model: nn.Module, config: TrainConfig, procs: Processes, device: torch.device) -> nn.Module:
    """The module the steps call: DDP over several processes, compiled with --compile. `model` stays the plain
    module, which evaluation, fill-mask and checkpoints use."""
    if procs.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if config.cuda_graphs:
        # Static shapes, one graph per shape: few occur (full batches, an epoch's short last batch, one or two
        # padded label counts). Letting dynamo switch to dynamic shapes at the second shape costs far more.
        model = torch.compile(model, mode="reduce-overhead", dynamic=False)
    elif config.compile:
        model = torch.compile(model)
    return model


def make_loader(batches: StepBatches, progress: Progress, config: TrainConfig,
                device: torch.device) -> torch.utils.data.DataLoader:
    """The epoch's remaining steps (from progress.step_in_epoch on), masked in `num_workers` worker processes."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(progress.step_in_epoch, len(batches)),
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
        # Its own generator: creating an iterator must not draw from the global RNG (dropout's).
        generator=torch.Generator().manual_seed(config.seed),
    )


def move_to_device(micro_cpu: list[dict[str, torch.Tensor]], device: torch.device, *,
                   compiled: bool) -> list[dict[str, torch.Tensor]]:
    """The step's micro-batches on `device`; copies from pinned memory do not wait for the GPU."""
    micro = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_cpu]
    if compiled:  # the labelled count changes every step: one graph for any count from the start, no recompile
        for batch in micro:
            torch._dynamo.mark_dynamic(batch["label_positions"], 0)
    return micro


def advance(progress: Progress, *, skipped: bool) -> None:
    progress.global_step += 1
    progress.step_in_epoch += 1
    progress.schedule_step += 0 if skipped else 1  # a step the fp16 GradScaler skipped does not move the schedule


class Meter:
    """Loss, tokens and time since the last log, and the whole run's training time and tokens."""

    def __init__(self, device: torch.device, *, seconds: float = 0.0, tokens: int = 0):
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: read back once per log interval
        self.steps = self.tokens = 0
        self.seconds = 0.0
        self.train_seconds, self.total_tokens = seconds, tokens  # the run's, earlier segments included
        self.clock = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        now = time.perf_counter()
        self.seconds += now - self.clock
        self.train_seconds += now - self.clock
        self.clock = now
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens
        self.total_tokens += tokens

    def restart_clock(self) -> None:
        """Start timing anew, so that what ran since the last step (eval, checkpoint) is not counted."""
        self.clock = time.perf_counter()

    def start_interval(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.tokens, self.seconds = 0, 0, 0.0

    def tokens_per_second(self) -> float:
        return self.total_tokens / self.train_seconds if self.train_seconds else 0.0


class NonFiniteLoss(MLMError):
    pass


def log_training(run: Run, meter: Meter, bar: tqdm, epoch: float, lr: float, result: StepResult) -> None:
    """Log the mean loss since the last log (averaged over processes; the only read-back of the loss) and the
    interval's tokens/s; stop the run if the loss is NaN or infinite."""
    loss_sum = all_reduce_sum(meter.loss_sum.detach().clone(), run.procs) / run.procs.world_size
    mean_loss = loss_sum.item() / meter.steps
    if not math.isfinite(mean_loss):
        raise non_finite(run, f"The training loss became {mean_loss}")
    tokens_per_second = meter.tokens / meter.seconds if meter.seconds else 0.0
    run.log.write("train", step=run.progress.global_step, epoch=epoch, loss=mean_loss, lr=lr,
                  grad_norm=float(result.grad_norm), tokens_per_second=tokens_per_second, skipped=result.skipped)
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
    meter.start_interval()


def non_finite(run: Run, what: str) -> NonFiniteLoss:
    where = (f"the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint
             else "no checkpoint was written yet")
    return NonFiniteLoss(f"{what} by step {run.progress.global_step}; stopping without saving the damaged weights "
                         f"({where}). Try a lower --lr, --precision bf16 or fp32, or warmup.")


def save_checkpoint(run: Run, meter: Meter) -> None:
    """A resumable checkpoint (main process) of finite weights, then every process waits for it."""
    # Logs check the loss only every --log-every steps: a save in between must not keep NaN weights.
    if not math.isfinite(float(meter.loss_sum)):
        raise non_finite(run, "The training loss became non-finite")
    if not bool(torch.stack([p.detach().isfinite().all() for p in run.model.parameters()]).all()):
        raise non_finite(run, "The weights became non-finite")
    if run.procs.is_main:
        run.progress.train_seconds, run.progress.train_tokens = meter.train_seconds, meter.total_tokens
        try:
            run.last_checkpoint = str(save_training_checkpoint(
                run.output_dir, model=run.model, optimizer=run.optimizer, scaler=run.precision.scaler,
                progress=run.progress, tokenizer=run.tokenizer, keep_last=run.config.keep_checkpoints,
                settings=run_settings(run.config, run.schedule)))
        except OSError as err:
            where = (f"the last good checkpoint, {run.last_checkpoint}, is intact: --resume latest continues from it"
                     if run.last_checkpoint else "no checkpoint was written yet")
            raise MLMError(f"Could not write the checkpoint of step {run.progress.global_step} in "
                           f"{run.output_dir / 'checkpoints'}: {err.strerror or err}; {where}. Free some space "
                           "(or fix the folder's permissions) first.") from None
        run.folder.commit()
    barrier(run.procs)


def finish(run: Run, meter: Meter, *, before: EvalResult | None, after: EvalResult | None,
           interrupted: bool) -> RunSummary:
    """After the loop: fill-mask predictions and the final model (unless interrupted), summary.json, and the end
    of the process group."""
    if not interrupted:
        fill_mask_and_log(run, "after")
        if run.procs.is_main:
            save_pretrained(run.model, run.output_dir, tokenizer=run.tokenizer)
            run.folder.commit()
    summary = RunSummary(status="interrupted" if interrupted else "finished", output_dir=str(run.output_dir),
                         steps=run.progress.global_step, before=before, after=after, train_seconds=meter.train_seconds,
                         train_tokens_per_second=meter.tokens_per_second(), checkpoint=run.last_checkpoint)
    if run.procs.is_main:
        (run.output_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        if not interrupted:  # README.md, pushed or not: the Hub shows it as the model's page
            write_run_model_card(run.output_dir, model_id=run.config.hub_model_id or str(run.output_dir))
    run.log.close()
    end_processes(run.procs)
    return summary
