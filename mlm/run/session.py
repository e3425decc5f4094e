"""The run layer: a run's folder, record, checkpoints, logs and signals, behind the calls the training loop makes.

mlm/train.py calls, in this order:

    open_run(config, procs, device)   lock the output folder; Ctrl-C, SIGTERM and SIGHUP stop cleanly from now
                                      on; find where the run starts (a new run, or a checkpoint to resume)
    run.restore(model, ...)           on resume, refuse changed settings or data, then load the checkpoint
    run.begin(...)                    only now is the folder written: the run record, the metrics log, notes
    run.after_step(...)               after every optimizer step: count, log, agree on a stop (True: stop)
    run.record_eval / record_fill_mask
    run.save_checkpoint()
    run.finish() or run.stopped()     the final model and the finished record, or the record of a stop

If anything fails or a signal arrives before the first checkpoint, the folder is left as it was; after it, the
folder resumes with `--resume latest`. This package never imports the loop: it gets the settings as data
(mlm/settings.py) and the objects it saves.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from mlm.errors import Interrupted, MLMError
from mlm.evaluate import EvalResult
from mlm.files.data_files import find_data_files
from mlm.files.hashing import file_sha256, tokenizer_sha256
from mlm.files.pretrained import save_pretrained
from mlm.run.checkpoints import (
    CheckpointError,
    Progress,
    checkpoint_step,
    list_checkpoints,
    load_training_checkpoint,
    newest_good_checkpoint,
    read_state,
    restore_legacy_rng_states,
    save_training_checkpoint,
    verify_checkpoint,
)
from mlm.run.folder import RUN_FILES, RunFolder
from mlm.run.metrics import Meter, MetricsLog
from mlm.run.model_card import write_run_model_card
from mlm.run.processes import (
    Processes,
    all_reduce_sum,
    any_process,
    barrier,
    end_processes,
    gather_rng_states,
    restore_rng_state,
)
from mlm.run.record import RunRecord, read_record, write_record
from mlm.run.signals import Signals
from mlm.run.tensorboard_log import TensorBoardLog, require_tensorboard
from mlm.settings import LENGTH_SETTINGS, RUN_SETTINGS, TrainConfig

# Settings that say how to run, not what: a resume may change them (the record notes each change).
NOT_COMPARED = set(RUN_SETTINGS) | {"resume", "overwrite", "extend", "output_dir"}


@dataclass
class RunSummary:
    """What train() returns: a view of the run record."""

    status: str  # finished | interrupted
    output_dir: str
    steps: int
    before: EvalResult | None  # the starting model's, measured by the run's first segment
    after: EvalResult | None
    train_seconds: float  # over all segments of the run
    train_tokens_per_second: float
    checkpoint: str | None  # the last checkpoint written, if any
    stopped_by: str | None = None  # the signal that stopped an interrupted run


@contextmanager
def open_run(config: TrainConfig, procs: Processes, device: torch.device):
    """The run on `config.output_dir`: locked for this run alone, with signals handled, until the block ends."""
    if config.report_to == "tensorboard":
        require_tensorboard()  # a missing package stops the run here, before the output folder is touched
    with Signals() as signals:
        folder = RunFolder.lock(config.output_dir, is_main=procs.is_main)  # a second run on the folder stops here
        run = Run(config, procs, device, folder, signals)
        try:
            run.find_start()
            yield run
        except BaseException as err:
            run.end_with(err)
            if isinstance(err, KeyboardInterrupt):
                raise Interrupted(getattr(err, "signal_name", "SIGINT"), hint=run.continue_hint()) from None
            raise
        finally:
            folder.release()


class Run:
    """One run in progress; the loop's handle on everything outside the model and the data."""

    def __init__(self, config: TrainConfig, procs: Processes, device: torch.device, folder: RunFolder,
                 signals: Signals):
        self.config, self.procs, self.device, self.folder, self.signals = config, procs, device, folder, signals
        self.output_dir = folder.path
        self.resume_from: Path | None = None
        self.record: RunRecord | None = None  # read at find_start on resume, made at restore for a new run
        self.progress = Progress()
        self.already_finished = False  # --resume of a finished run: nothing to do
        self.last_checkpoint: str | None = None
        self.changed: dict = {}  # harmless settings a resume changed: {name: [before, now]}
        self.notes: list[str] = []
        self.began = False
        self.log: MetricsLog | None = None  # opened by begin(), like the meter and the progress bar

    def say(self, message: str) -> None:
        if self.procs.is_main:
            tqdm.write(message)

    # -- where the run starts --------------------------------------------------------------------------------

    def find_start(self) -> None:
        """A new run, or the checkpoint to resume and the record it continues. Reads only."""
        self.resume_from = self.folder.resume_point(self.config.resume, self.config.overwrite)
        if self.resume_from is None:
            return
        try:
            verify_checkpoint(self.resume_from)
            read_state(self.resume_from)
        except CheckpointError as err:
            raise bad_checkpoint(self.resume_from, err) from None
        here = read_record(self.output_dir) if self.output_dir.is_dir() else None
        theirs = read_record(self.resume_from)  # None in checkpoints of mlm before run records
        inside = self.resume_from.resolve().parent == (self.output_dir / "checkpoints").resolve()
        if not inside:
            self._check_foreign_checkpoint(here, theirs)
        if theirs is None:
            theirs = RunRecord(settings=read_state(self.resume_from).get("settings") or {})
        elif here is not None and here.run_id == theirs.run_id:
            theirs.segments = here.segments  # the whole history; the results as of the checkpoint
        self.record = theirs
        self.last_checkpoint = str(self.resume_from)
        newest = inside and checkpoint_step(self.resume_from) == (here.progress["step"] if here else -1)
        self.already_finished = bool(here and here.finished and newest and not self.config.extend)

    def _check_foreign_checkpoint(self, here: RunRecord | None, theirs: RunRecord | None) -> None:
        """--resume PATH into another folder: continue that run there only if the folder is empty (or holds it)."""
        theirs_name = f"run {theirs.run_id}" if theirs else "another run"
        if any((self.output_dir / name).exists() for name in RUN_FILES):
            if here is None or theirs is None or here.run_id != theirs.run_id:
                held = f"run {here.run_id}" if here else "another run"
                raise MLMError(f"--resume {self.resume_from} is a checkpoint of {theirs_name}, but {self.output_dir} "
                               f"holds {held}; nothing was changed. To continue {theirs_name}, give an empty "
                               "--output-dir; to continue this folder's run, use --resume latest.")
            return
        self.notes.append(f"continuing {theirs_name} from {self.resume_from} in {self.output_dir}: its record is "
                          "copied here and its new checkpoints are written here.")

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler | None, *, tokenizer, global_batch: int, total_steps: int) -> Progress:
        """Step 0 of a new run; on resume, the checkpoint's weights, optimizer and RNG states, once the settings
        and the data are checked against the record."""
        settings = {**settings_as_json(self.config), "global_batch": global_batch}
        data = data_identity(self.config, tokenizer)
        if self.resume_from is None:
            self.record = RunRecord(settings=settings, data=data, world_size=self.procs.world_size)
            return self.progress
        self.changed = compare_settings(self.record.settings, settings, extend=self.config.extend,
                                        where=self.resume_from.parent.parent)
        compare_data(self.record.data, data)
        try:
            self.progress, rng = load_training_checkpoint(self.resume_from, model=model, optimizer=optimizer,
                                                          scaler=scaler)
        except CheckpointError as err:  # e.g. non-finite weights, which no checksum catches
            raise bad_checkpoint(self.resume_from, err) from None
        if self.progress.global_step > total_steps:
            raise MLMError(f"{self.resume_from} is at step {self.progress.global_step}, past the {total_steps} steps "
                           "of --epochs/--max-steps: with --extend, give at least as many.")
        self._restore_dropout_streams(rng)
        return self.progress

    def _restore_dropout_streams(self, rng: dict[str, torch.Tensor]) -> None:
        if self.record.world_size != self.procs.world_size:
            self.say(f"note: the run had {self.record.world_size} process(es), this one has {self.procs.world_size}: "
                     "the masks and the schedule stay the same, the dropout draws differ from an uninterrupted run.")
        if restore_rng_state(rng, self.procs, self.device):
            return
        if "rng.cpu" in rng and self.procs.rank == 0:  # a checkpoint of an mlm that stored rank 0's alone
            restore_legacy_rng_states(rng)
            return
        # This rank was not in the run that wrote the checkpoint (more processes now): a stream of its own.
        seed = np.random.SeedSequence([self.config.seed, self.procs.rank, self.progress.global_step])
        torch.manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0] >> 1))

    # -- the run starts writing ------------------------------------------------------------------------------

    def begin(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, tokenizer,
              precision: str, model_variant: str, derived: dict) -> None:
        """Make the folder ready, write the record, open the metrics log and announce the run."""
        self.model, self.optimizer, self.scaler, self.tokenizer = model, optimizer, scaler, tokenizer
        config, record = self.config, self.record
        self.notes += self.folder.start(overwrite=config.overwrite, resume_from=self.resume_from)
        if self.resume_from is not None and self.procs.is_main:
            self.notes += discard_later_checkpoints(self.output_dir, self.resume_from)
        barrier(self.procs)  # nobody writes before rank 0 has made the folder ready
        for segment in record.segments:
            if segment["end"] == "running":  # its process was killed before it could say so
                segment["end"] = "killed"
        record.keep_results_up_to(self.progress.global_step)
        record.settings = {**settings_as_json(config), "global_batch": derived["global_batch"]}
        record.derived = derived
        record.start_segment(step=self.progress.global_step, device=str(self.device), precision=precision,
                             model_variant=model_variant, world_size=self.procs.world_size, changed=self.changed)
        self.began = True
        self._write_record()
        self.log = MetricsLog(self.output_dir / "metrics.jsonl", enabled=self.procs.is_main,
                              segment=len(record.segments) - 1,
                              listeners=(TensorBoardLog(self.output_dir),)
                              if config.report_to == "tensorboard" and self.procs.is_main else ())
        self.meter = Meter(self.device, seconds=record.progress["train_seconds"],
                           tokens=record.progress["train_tokens"])
        self.bar = tqdm(total=derived["total_steps"], initial=self.progress.global_step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not (self.procs.is_main and config.progress_bar))
        for note in self.notes:
            self.say(f"note: {note}")
        if self.resume_from is not None:
            self.log.write("resume", step=self.progress.global_step, checkpoint=str(self.resume_from),
                           changed=self.changed)
            self.say(f"Resuming run {record.run_id} from {self.resume_from} (epoch {self.progress.epoch + 1}, step "
                     f"{self.progress.global_step}/{derived['total_steps']}).")
        self.say(f"Model: {model_variant}.")
        self.say(f"{derived['parameters']:,} parameters on {self.device} ({precision}); {derived['train_chunks']:,} "
                 f"train / {derived['eval_chunks']:,} eval chunks of {config.chunk_size}; {derived['total_steps']} "
                 f"steps of {derived['global_batch']} chunks. Record: {self.output_dir / 'run.json'}")

    @property
    def is_new(self) -> bool:
        return self.resume_from is None

    # -- during the run --------------------------------------------------------------------------------------

    def after_step(self, *, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: bool | torch.Tensor,
                 lr: float | torch.Tensor, tokens: int, epoch: float, log_now: bool) -> bool:
        """Count the step; every --log-every steps (and when `log_now`) log the mean loss. True: stop now.
        `skipped` and `lr` may be device tensors (fp16): they are read back only when a line is written."""
        self.meter.add(loss, tokens, skipped)
        self.bar.update(1)
        due = log_now or self.meter.steps >= self.config.log_every
        stopping = False
        # Every process reaches the same log steps, so they agree there on a stop request (a host sync under
        # DDP, hence not at every step) and all stop, and checkpoint, at the same step.
        if due or self.procs.world_size == 1:
            stopping = any_process(self.signals.received is not None, self.procs, self.device)
        if due or stopping:
            self._log_training(lr=lr, epoch=epoch, grad_norm=grad_norm)
        return stopping

    def _log_training(self, *, lr: float | torch.Tensor, epoch: float, grad_norm: torch.Tensor) -> None:
        """The mean loss since the last log (averaged over processes: the only read-back of the loss); a NaN or
        infinite loss stops the run."""
        meter = self.meter
        loss_sum = all_reduce_sum(meter.loss_sum.detach().clone(), self.procs) / self.procs.world_size
        mean_loss = loss_sum.item() / meter.steps
        if not math.isfinite(mean_loss):
            raise self._non_finite(f"The training loss became {mean_loss}")
        tokens_per_second, lr = meter.interval_tokens_per_second(), float(lr)
        # skipped: the steps since the last line whose fp16 gradients overflowed (their update was skipped)
        self.log.write("train", step=self.progress.global_step, epoch=epoch, loss=mean_loss, lr=lr,
                       grad_norm=float(grad_norm), tokens_per_second=tokens_per_second, skipped=meter.skipped())
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
        meter.start_interval()

    def record_eval(self, label: str, result: EvalResult) -> EvalResult:
        self.log.write("eval", label=label, step=self.progress.global_step, epoch=self.progress.epoch,
                       **asdict(result))
        self.record.add_eval(label, self.progress.global_step, self.progress.epoch, asdict(result))
        self._write_record()
        self.say(f"[{label}] step {self.progress.global_step}: perplexity {result.perplexity:.3f} "
                 f"(reference-style {result.reference_perplexity:.3f}), loss {result.loss:.4f}, "
                 f"masked-token accuracy {result.accuracy:.2%}")
        self.meter.restart_clock()  # tokens/s counts training only
        return result

    def record_fill_mask(self, label: str, prompts: list[str], predictions: list) -> None:
        """predictions: per prompt, per [MASK], the top-k (token, score) pairs."""
        for prompt, per_mask in zip(prompts, predictions):
            tokens = [[(p.token, round(p.score, 4)) for p in top_k] for top_k in per_mask]
            self.log.write("fill_mask", label=label, step=self.progress.global_step, prompt=prompt, predictions=tokens)
            self.record.results["fill_mask"][label].append({"prompt": prompt, "predictions": tokens})
            self.say(f"[{label}] {prompt} -> " + " | ".join(", ".join(f"{t} {s:.3f}" for t, s in m) for m in tokens))
        self._write_record()
        self.meter.restart_clock()

    def last_eval(self) -> EvalResult | None:
        """The eval at the current step, if the run has one (a resume after the last eval need not redo it)."""
        result = self.record.last_eval_at(self.progress.global_step)
        return EvalResult(**result) if result else None

    def save_checkpoint(self) -> None:
        """A resumable checkpoint (main process) of finite weights, then every process waits for it."""
        # Logs check the loss only every --log-every steps: a save in between must not keep NaN weights.
        if not math.isfinite(float(self.meter.loss_sum)):
            raise self._non_finite("The training loss became non-finite")
        if not bool(torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()):
            raise self._non_finite("The weights became non-finite")
        rng_states = gather_rng_states(self.procs, self.device)  # every process takes part
        if self.procs.is_main:
            self._note_progress()
            with self._writing(f"the checkpoint of step {self.progress.global_step}"):
                self.last_checkpoint = str(save_training_checkpoint(
                    self.output_dir, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                    progress=self.progress, tokenizer=self.tokenizer, keep_last=self.config.keep_checkpoints,
                    rng_states=rng_states, record_json=self.record.to_json()))
            self.folder.commit()
            self._write_record()
        barrier(self.procs)
        self.meter.restart_clock()

    # -- the end ---------------------------------------------------------------------------------------------

    def finish(self) -> RunSummary:
        """The final model in the Hub layout, the finished record and the model card."""
        self.bar.close()
        if self.procs.is_main:
            with self._writing("the final model"):
                save_pretrained(self.model, self.output_dir, tokenizer=self.tokenizer)
            share_final_weights(self.output_dir, self.last_checkpoint)
            self.folder.commit()
        self.record.results["after"] = self.record.last_eval_at(self.progress.global_step)
        self._note_progress()
        self.record.end_segment("finished", step=self.progress.global_step)
        self._write_record()
        if self.procs.is_main:  # README.md, pushed or not: the Hub shows it as the model's page
            write_run_model_card(self.output_dir, model_id=self.config.hub_model_id or str(self.output_dir))
        return self._close()

    def stopped(self) -> RunSummary:
        """The loop stopped on a signal, after saving a checkpoint."""
        self.bar.close()
        self._note_progress()
        self.record.end_segment(f"interrupted by {self.signals.received}", step=self.progress.global_step)
        self._write_record()
        return self._close()

    def summary(self) -> RunSummary:
        record = self.record or read_record(self.output_dir)
        results, progress = record.results, record.progress
        return RunSummary(
            status=record.status if record.status == "finished" else "interrupted", output_dir=str(self.output_dir),
            steps=progress["step"], before=EvalResult(**results["before"]) if results["before"] else None,
            after=EvalResult(**results["after"]) if results["after"] else None,
            train_seconds=progress["train_seconds"],
            train_tokens_per_second=progress["train_tokens"] / max(progress["train_seconds"], 1e-9),
            checkpoint=self.last_checkpoint, stopped_by=self.signals.received)

    def nothing_to_do(self) -> RunSummary:
        """--resume of a finished run: a flag that would change the run is refused all the same."""
        config = self.config
        global_batch = config.batch_size * config.grad_accum * self.procs.world_size
        compare_settings(self.record.settings, {**settings_as_json(config), "global_batch": global_batch},
                         extend=False, where=self.output_dir)
        self.say(f"{self.output_dir} holds a finished run: nothing to do (to train it for longer, resume with "
                 "--extend and more --epochs or --max-steps).")
        self.record = read_record(self.output_dir)
        return self._close()

    def _close(self) -> RunSummary:
        if self.log is not None:
            self.log.close()
        summary = self.summary()
        end_processes(self.procs)
        return summary

    def end_with(self, err: BaseException) -> None:
        """The run ends on an exception: record how (once it has a checkpoint), or undo what it wrote."""
        if self.began and self.procs.is_main and self.folder.committed:
            how = f"interrupted by {getattr(err, 'signal_name', 'SIGINT')}" if isinstance(err, KeyboardInterrupt) \
                else "failed"
            self.record.end_segment(how, step=self.progress.global_step)
            try:
                self._write_record()
            except OSError:
                pass  # the error being raised says more than this one
        self.folder.abandon()  # before the first checkpoint: the folder goes back to how it was

    def continue_hint(self) -> str:
        if self.last_checkpoint is None and not list_checkpoints(self.output_dir):
            # A chunk store cut short keeps its completed pieces (mlm/corpus_store.py): say so, or users redo it.
            return ("Nothing was saved: the output folder is as it was; data prepared so far is kept, and the "
                    "same command continues its preparation.")
        return f"Continue with: {resume_command(self.output_dir, self.procs.world_size)}"

    def _note_progress(self) -> None:
        self.record.progress = {"step": self.progress.global_step, "train_seconds": self.meter.train_seconds,
                                "train_tokens": self.meter.total_tokens}

    def _write_record(self) -> None:
        if self.procs.is_main:
            with self._writing("the run record"):
                write_record(self.output_dir, self.record)

    @contextmanager
    def _writing(self, what: str):
        """A full disk or a permission problem while writing is one line that says what is safe."""
        try:
            yield
        except (OSError, SafetensorError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            where = (f"the last good checkpoint, {self.last_checkpoint}, is intact: --resume latest continues from it"
                     if self.last_checkpoint else "no checkpoint was written yet")
            raise MLMError(f"Could not write {what} in {self.output_dir}: {reason}; {where}. Free some space (or fix "
                           "the folder's permissions) first.") from None

    def _non_finite(self, what: str) -> MLMError:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written yet")
        return MLMError(f"{what} by step {self.progress.global_step}; stopping without saving the damaged weights "
                        f"({where}). Try a lower --lr, --precision bf16 or fp32, or warmup.")


# ---------------------------------------------------------------------------------------------------------------
# Settings and data against the record


def settings_as_json(config: TrainConfig) -> dict:
    """Every field of `config`, JSON-able (tuples become lists, as they come back from run.json)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(config).items()}


def resumed_settings(output_dir: str, resume: str, given: dict) -> dict:
    """TrainConfig fields for `--resume`: the run's recorded settings, with the flags `given` on the command line
    on top (a run-defining flag that differs is refused later, listing the differences)."""
    source = Path(output_dir).expanduser() if resume == "latest" else Path(resume).expanduser()
    record = read_record(source) if source.is_dir() else None
    if record is None:
        return given
    stored = {name: tuple(value) if isinstance(value, list) else value for name, value in record.settings.items()
              if name in TrainConfig.__dataclass_fields__ and name not in ("output_dir", "resume", "overwrite",
                                                                             "extend")}
    return {**stored, **given}


def compare_settings(stored: dict, current: dict, *, extend: bool, where: Path) -> dict:
    """Refuse a resume whose settings change the run (RUN_SETTINGS), listing every difference; return the
    harmless changes {name: [before, now]} for the record."""
    differ = [name for name in RUN_SETTINGS if name in stored and stored[name] != current.get(name)]
    if extend:
        differ = [name for name in differ if name not in LENGTH_SETTINGS]
    if differ:
        def flag(name: str) -> str:
            return ("the global batch (--batch-size x --grad-accum x processes)" if name == "global_batch"
                    else f"--{name.replace('_', '-')}")
        listed = "; ".join(f"{flag(name)} {stored[name]!r} -> {current.get(name)!r}" for name in differ)
        hint = " To train for longer (or shorter), add --extend." if set(differ) & set(LENGTH_SETTINGS) else ""
        raise MLMError(f"--resume would change the run in {where}: {listed}. Resume without these flags (the run "
                       f"record, run.json, has its settings), or start a new run in another --output-dir.{hint}")
    return {name: [stored[name], value] for name, value in current.items()
            if name not in NOT_COMPARED and name in stored and stored[name] != value}


def data_identity(config: TrainConfig, tokenizer) -> dict:
    """The sha256 of every data file the run reads, and of the tokenizer: edited data changes what the run trains
    and scores on, so a resume must see the same bytes."""
    files = [file for split in config.train_splits for file in find_data_files(config.dataset, split)]
    if config.eval_split:
        files += find_data_files(config.dataset, config.eval_split)
    if config.validation_file:
        files.append(Path(config.validation_file).expanduser())
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return {"files": {str(f.relative_to(root)): file_sha256(f) for f in files},
            "tokenizer_sha256": tokenizer_sha256(tokenizer)}


def compare_data(stored: dict, current: dict) -> None:
    if not stored:  # a checkpoint of an mlm before run records
        return
    if stored.get("tokenizer_sha256") != current["tokenizer_sha256"]:
        raise MLMError("The tokenizer differs from the one the run started with (its sha256 changed): resume with "
                       "the run's tokenizer, or start a new run in another --output-dir.")
    for name, digest in stored.get("files", {}).items():
        now = current["files"].get(name)
        if now != digest:
            what = "is missing" if now is None else "changed since the run started (its sha256 differs)"
            raise MLMError(f"The data file {name} {what}: the run would train and score on other text. Restore it, "
                           "or start a new run in another --output-dir.")
    extra = sorted(set(current["files"]) - set(stored.get("files", {})))
    if extra:
        raise MLMError(f"The data now holds {extra[0]}, which the run did not start with. Remove it, or start a new "
                       "run in another --output-dir.")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints of the folder


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


def share_final_weights(output_dir: Path, checkpoint: str | None) -> None:
    """The last checkpoint holds the same weights as the final model: make its model.safetensors a hard link to
    the final one, so a finished folder stores them once. The bytes, hence the manifest, are unchanged."""
    if checkpoint is None:
        return
    final, saved = output_dir / "model.safetensors", Path(checkpoint) / "model.safetensors"
    try:
        if saved.stat().st_size != final.stat().st_size or file_sha256(saved) != file_sha256(final):
            return
        link = saved.with_name(".model.safetensors.link")
        link.unlink(missing_ok=True)
        os.link(final, link)
        os.replace(link, saved)
    except OSError:  # a file system without hard links: two copies, as before
        pass


def resume_command(output_dir: Path, world_size: int) -> str:
    """The command that continues the run, to copy as it is: every setting comes from the run record."""
    folder = shlex.quote(str(output_dir))
    if world_size > 1:
        return f"torchrun --nproc_per_node {world_size} -m mlm.cli.train --resume latest --output-dir {folder}"
    return f"mlm-train --resume latest --output-dir {folder}"
