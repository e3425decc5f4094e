"""The run layer behind the calls the loop (mlm/train.py) makes on a run: its processes, folder, record, logs,
checkpoints and signals. If anything fails before the first checkpoint the folder is left as it was
(mlm/run/folder.py); after it, `--resume latest` continues."""

from __future__ import annotations

import math
import os
import shlex
import shutil
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from mlm.corpus import run_sources
from mlm.errors import Interrupted, MLMError, clipped, listed
from mlm.evaluate import EvalResult
from mlm.files.data_files import find_data_files
from mlm.files.hashing import file_sha256, tokenizer_sha256
from mlm.files.pretrained import CONFIG_FILE, WEIGHTS_FILE, save_pretrained
from mlm.run.checkpoints import (
    STATE_FILE,
    CheckpointError,
    Progress,
    checkpoint_step,
    damaged,
    list_checkpoints,
    load_training_checkpoint,
    read_state,
    save_training_checkpoint,
    verify_checkpoint,
)
from mlm.run.folder import RunFolder, folder_record
from mlm.run.metrics import METRICS_FILE, Console, Meter, MetricsLog, flops_per_token, peak_flops
from mlm.run.model_card import CARD_FILE, write_run_model_card
from mlm.run.processes import Processes, end_processes, lost_a_process, start_processes
from mlm.run.record import RECORD_FILE, RunRecord, read_record, write_record
from mlm.run.signals import Signals, ignore_stop_signals
from mlm.run.tensorboard_log import LOG_DIR, TensorBoardLog, require_tensorboard
from mlm.settings import LENGTH_SETTINGS, RUN_SETTINGS, TrainConfig

__all__ = ["Processes", "Run", "RunSummary", "ignore_stop_signals", "open_run"]

# Settings that name where the model and the data are: a resume compares what is there (the data's and tokenizer's
# sha256, the model's config), not the path, so a moved folder still resumes; the record keeps the new place.
WHERE_SETTINGS = {"model", "tokenizer", "revision", "dataset", "validation_file"}
HOW_TO_RESUME = {"resume", "overwrite", "extend", "output_dir"}  # a resume's own flags: not changes to the run


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
    is_main: bool = True  # the process that writes (and reports) the run


@contextmanager
def open_run(config: TrainConfig):
    """The run on `config.output_dir`: processes started, the folder locked, signals handled, until the block ends."""
    if config.report_to == "tensorboard":
        require_tensorboard()  # a missing package stops the run here, before the output folder is touched
    procs = start_processes(config.device)
    with Signals() as signals:
        folder = RunFolder.lock(config.output_dir, is_main=procs.is_main)  # a second run on the folder stops here
        run = Run(config, procs, folder, signals)
        try:
            run.find_start()
            yield run
        except BaseException as err:
            signals.ending()
            lost = procs.world_size > 1 and lost_a_process(err)
            run.end_with(err, "interrupted: another process ended" if lost else None)
            if isinstance(err, KeyboardInterrupt):
                raise Interrupted(getattr(err, "signal_name", "SIGINT"), hint=run.continue_hint()) from None
            if lost:
                reason = clipped(str(err), 160)
                raise MLMError(f"Another process of the run ended, so this one stops too ({reason}). "
                               f"{run.continue_hint()}") from None
            raise
        finally:
            folder.release()
            end_processes(procs)


class Run:
    """One run in progress; the loop's handle on everything outside the model and the data."""

    def __init__(self, config: TrainConfig, procs: Processes, folder: RunFolder, signals: Signals):
        self.config, self.procs, self.folder, self.signals = config, procs, folder, signals
        self.output_dir, self.progress, self.notes = folder.path, Progress(), []
        self.resume_from: Path | None = None  # the checkpoint a resume continues, found by find_start
        self.record: RunRecord | None = None  # a resume's, read by find_start; a new run's, made by start()
        self.last_checkpoint: str | None = None
        self.log: MetricsLog | None = None  # opened by start(), like the meter
        self.already_finished = self.stop_requested = False  # already_finished: --resume of a finished run
        self.stopped_by: str | None = None  # the signal every process agreed to stop on
        self.console = Console(procs.is_main, config.progress_bar, total=0, done=0)
        self.say = self.console.say

    # -- where the run starts --------------------------------------------------------------------------------

    def find_start(self) -> None:
        """A new run, or the checkpoint to resume and the record it continues; the data read. Reads only, but for
        putting back a run that a killed --overwrite had moved aside."""
        config, out = self.config, self.output_dir
        if self.procs.is_main:
            self.folder.recover_interrupted_overwrite()
        self.procs.barrier()  # the others read the folder once rank 0 holds it and has put back a replaced run
        self.resume_from = checkpoint = self.folder.resume_point(config.resume, config.overwrite)
        if checkpoint is None:
            return
        here = folder_record(out)
        # `extend` with the run's own length has nothing to extend: it would only write the same model again.
        finished = here is not None and here.finished and not (
            config.extend and run_length(settings_as_json(config)) != run_length(here.settings))
        if finished and config.resume == "latest":  # whatever its checkpoints, nothing to train: the model stays
            self.record, self.last_checkpoint, self.already_finished = here, str(checkpoint), True
            return
        if config.resume == "latest" and here and checkpoint_step(checkpoint) < (here.final_model_step or 0):
            raise MLMError(f"`resume` latest: the newest checkpoint of {out}, {checkpoint.name}, comes before the "
                           f"final model of step {here.final_model_step}: it would train those steps again and remove "
                           f"that model. To do so, resume {checkpoint} itself; to train the final model further, start "
                           f"a new run from it (--model {out}) in another output folder.")
        try:
            verify_checkpoint(checkpoint)
            read_state(checkpoint)
            theirs = read_record(checkpoint)
        except MLMError as err:
            raise damaged(checkpoint, err) from None
        if here is not None and here.run_id != theirs.run_id:
            raise MLMError(f"{checkpoint} is a checkpoint of run {theirs.run_id}, but {out} holds run {here.run_id}; "
                           f"nothing was changed. To continue run {theirs.run_id}, give it an empty output folder; to "
                           "continue this folder's run, resume its own checkpoints.")
        if here is None:
            if others := self.folder.files_not_of_the_run():
                raise MLMError(f"`resume` {checkpoint}: {out} holds files of no run ({others[0]}…): continue the run "
                               "in an empty or new output folder.")
            self.notes.append(f"continuing run {theirs.run_id} from {checkpoint} in {out}: its record is copied here "
                              "and its new checkpoints are written here.")
        else:  # the folder's record has the run's latest settings (and what they gave) and history; the results are
            # the checkpoint's
            theirs.settings, theirs.derived, theirs.segments, theirs.written = (here.settings, here.derived,
                                                                                here.segments, here.written)
        self.record = theirs  # its data files are the run's from here on: the same bytes, checked before any tokenizing
        compare_data(theirs.data.get("files", {}), data_file_digests(config))
        self.last_checkpoint = str(checkpoint)
        self.already_finished = finished and checkpoint_step(checkpoint) == here.progress["step"]

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, tokenizer, *, path: str,
              precision: str, facts: dict, notes: list[str] = ()) -> None:
        """Step 0, or the checkpoint's state once the settings and tokenizer match the record; then the folder made
        ready, the record written, the metrics log opened and the run announced."""
        self.model, self.optimizer, self.scaler, self.tokenizer = model, optimizer, scaler, tokenizer
        config, procs, resuming = self.config, self.procs, not self.is_new
        self.total_steps, self.steps_per_epoch = facts["total_steps"], facts["steps_per_epoch"]
        settings = {**settings_as_json(config), "global_batch": facts["global_batch"]}
        data = {"files": self.record.data.get("files", {}) if resuming else data_file_digests(config),
                "tokenizer_sha256": tokenizer_sha256(tokenizer)}
        if resuming:
            changed = compare_settings(self.record.settings, settings, extend=config.extend, where=self.output_dir,
                                       world_size=procs.world_size)  # {name: [before, now]}
            if facts["train_chunks"] != (drawn := self.record.derived.get("train_chunks", facts["train_chunks"])):
                raise MLMError(f"The run drew {drawn} train chunks, and the same settings and data now draw "
                               f"{facts['train_chunks']}: mlm draws them otherwise since it started. Resume with the "
                               "mlm version that started the run, or start a new run in another output folder.")
            if not config.extend and facts["total_steps"] != self.record.derived.get("total_steps", self.total_steps):
                raise MLMError(f"The run was set to {self.record.derived['total_steps']} steps, and its settings now "
                               f"give {self.total_steps}: resume with `extend` to train for {self.total_steps}.")
            if self.record.data.get("tokenizer_sha256") != data["tokenizer_sha256"]:
                raise MLMError("The tokenizer differs from the one the run started with (its sha256 changed): resume "
                               "with the run's tokenizer, or start a new run in another output folder.")
            self._restore(model, optimizer, scaler)
        else:
            changed, self.record = {}, RunRecord(settings=settings)
        self.notes += self.folder.start(overwrite=config.overwrite, resuming=resuming)
        # One dict: the record lists every name the run writes, as it writes. Only now: before start() commits a
        # resumed run, a stop would remove them all.
        self.folder.written = self.record.written
        if resuming and procs.is_main:
            self._drop_the_abandoned_course()
        procs.barrier()  # nobody writes before rank 0 has made the folder ready
        record, step = self.record, self.progress.global_step
        record.settings, record.derived, record.data = settings, facts, data
        record.start_segment(step=step, device=str(procs.device), precision=precision, model_variant=path,
                             world_size=procs.world_size, changed=changed)
        tensorboard = config.report_to == "tensorboard"
        record.written.update({METRICS_FILE: None, **({LOG_DIR: None} if tensorboard else {})})
        self._write_record()
        listeners = (TensorBoardLog(self.output_dir),) if tensorboard and procs.is_main else ()
        self.log = MetricsLog(self.output_dir / METRICS_FILE, enabled=procs.is_main, segment=len(record.segments) - 1,
                              listeners=listeners)
        self.meter = Meter(procs.device, seconds=record.progress["train_seconds"],
                           tokens=record.progress["train_tokens"])
        self.console.total, self.console.done = self.total_steps, step
        self.peak_flops = peak_flops(procs.device, precision)
        for note in [*self.notes, *notes]:
            self.say(f"note: {note}")
        if resuming:
            # Absolute, as every path the record keeps: a push then names it by its last part (mlm/run/hub_push.py).
            self.log.write("resume", step=step, checkpoint=str(self.resume_from.resolve()), changed=changed)
            at = self.progress  # a checkpoint at an epoch's end holds the count of epochs done, step 0 of the next
            epoch = f"end of epoch {at.epoch}" if at.step_in_epoch == 0 and at.epoch else f"epoch {at.epoch + 1}"
            self.say(f"Resuming run {record.run_id} from {self.resume_from} ({epoch}, step {step}/{self.total_steps}).")
        self.say(f"Model: {path}.")
        self.say(f"{facts['parameters']:,} parameters on {procs.device} ({precision}); {facts['train_chunks']:,} train "
                 f"/ {facts['eval_chunks']:,} eval chunks of {config.chunk_size}; {self.total_steps} "
                 f"step{'s' * (self.total_steps != 1)} of {min(facts['global_batch'], facts['train_chunks'])} "
                 "chunks. Record: "
                 f"{self.output_dir / RECORD_FILE}")

    def _drop_the_abandoned_course(self) -> None:
        """Resuming from an older checkpoint redoes the steps after it. What the run saved after that step belongs to
        the abandoned course and would pass as the new one's (scored, pushed, resumed): the later checkpoints of this
        folder, and the final model and the card the run wrote (a card the user edited stays). A resume --extend
        from the very step of the final model keeps it."""
        step, name = self.progress.global_step, self.resume_from.name
        for later in list_checkpoints(self.output_dir):  # this run's (find_start checks the run id), wherever `name` is
            if checkpoint_step(later) > step:
                shutil.rmtree(later)
                self.notes.append(f"removed {later.name}: it follows {name}, whose later steps run again now.")
        if step < (final := self.record.final_model_step or 0):
            for segment in self.record.segments:  # the folder holds no final model of the run's from here on
                segment.pop("final_model", None)
            if gone := [file for file in (CONFIG_FILE, WEIGHTS_FILE, *self.tokenizer.saved_files, CARD_FILE)
                        if (self.output_dir / file).exists() and self.folder.may_replace(file)]:
                for file in gone:
                    (self.output_dir / file).unlink()
                card = " and its model card" if CARD_FILE in gone else ""
                self.notes.append(f"removed the final model of step {final}{card}: {name} comes before it, and "
                                  "its later steps run again now.")

    def _restore(self, model, optimizer, scaler) -> None:
        try:
            self.progress, rng = load_training_checkpoint(self.resume_from, model=model, optimizer=optimizer,
                                                          scaler=scaler)
        except CheckpointError as err:  # e.g. non-finite weights, which no checksum catches
            raise damaged(self.resume_from, err) from None
        position = self.progress
        if (position.step_in_epoch >= self.steps_per_epoch or position.schedule_step > position.global_step
                or position.epoch * self.steps_per_epoch + position.step_in_epoch != position.global_step):
            # No run gets there; resuming would loop forever over an epoch it is already past.
            raise damaged(self.resume_from, CheckpointError(
                f"{self.resume_from / STATE_FILE} says its step {position.global_step} is step "
                f"{position.step_in_epoch} of epoch {position.epoch + 1}, but an epoch of the run has "
                f"{self.steps_per_epoch} steps: no run gets there."))
        if self.progress.global_step > self.total_steps:
            raise MLMError(f"{self.resume_from} is at step {self.progress.global_step}, past the {self.total_steps} "
                           f"step{'s' * (self.total_steps != 1)} of `epochs`/`max_steps`: with `extend`, give at "
                           "least as many.")
        if self.record.world_size != self.procs.world_size:
            self.say(f"note: the run had {self.record.world_size} process(es), this one has {self.procs.world_size}: "
                     "the masks and the schedule stay the same, the dropout draws differ from an uninterrupted run.")
        if not self.procs.restore_rng_state(rng):
            # This rank was not in the run that wrote the checkpoint (more processes now): a stream of its own.
            seed = np.random.SeedSequence([self.config.seed, self.procs.rank, self.progress.global_step])
            torch.manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0] >> 1))

    @property
    def is_new(self) -> bool:
        return self.resume_from is None

    @property
    def added_tokens(self) -> list[str] | None:
        """The words a resume adds to the tokenizer again (`add_tokens`): its record's. None for a new run."""
        return None if self.is_new else self.record.derived.get("added_tokens")

    # -- during the run --------------------------------------------------------------------------------------

    def after_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, *, ran: int | torch.Tensor,
                   lr: float | torch.Tensor, tokens: int, labelled: int) -> None:
        """Count the step; every --log-every steps (and at each epoch's end and the last step) log the mean loss over
        the processes, the only read-back of the loss: a NaN or infinite one stops the run. `ran` and `lr` may be
        device tensors (fp16): they are read back only when a line is written."""
        meter, progress, procs = self.meter, self.progress, self.procs
        meter.add(loss, tokens, ran, labelled)
        self.console.step()
        # A step of the run, not of this segment, as Trainer logs: a resumed run logs where an uninterrupted one does.
        due = progress.global_step % self.config.log_every == 0 or self._due(None)
        # Every process reaches the same log steps, so they agree there on a stop request (a host sync under DDP,
        # hence not at every step) and all stop, and checkpoint, at the same step.
        if due or procs.world_size == 1:
            self.stopped_by = procs.agree_on_signal(self.signals.received)
            self.stop_requested = self.stopped_by is not None
            if self.stop_requested and self.signals.received is None:  # only another process got it: say so here
                self.say(f"{self.stopped_by} received by another process of the run: saving a checkpoint, then "
                         "stopping.")
        if not (due or self.stop_requested):
            return
        mean_loss = sum(procs.gather(float(meter.loss_sum))) / procs.world_size / meter.steps
        if not math.isfinite(mean_loss):
            raise self._non_finite(f"The training loss became {mean_loss}")
        tokens_per_second = meter.tokens / meter.seconds if meter.seconds else 0.0
        flops = flops_per_token(self.model.config, self.config.chunk_size, meter.labelled / max(meter.tokens, 1))
        values = {"epoch": progress.epoch + progress.step_in_epoch / self.steps_per_epoch, "loss": mean_loss,
                  "lr": float(lr), "grad_norm": float(grad_norm), "tokens_per_second": tokens_per_second,
                  "mfu": flops * tokens_per_second / self.peak_flops if self.peak_flops else None}
        # skipped: the steps since the last line whose fp16 gradients overflowed (their update was skipped)
        self.log.write("train", step=progress.global_step, **values, skipped=meter.steps - int(meter.ran))
        self.console.log(progress.global_step, values)
        meter.start_interval()

    def _due(self, every: int | None) -> str | None:
        """What is due after this step, if anything: each epoch's end, the last step, every `every` steps."""
        progress = self.progress
        if progress.step_in_epoch == 0:
            return f"epoch {progress.epoch}"
        if progress.global_step >= self.total_steps:
            return "final"
        return f"step {progress.global_step}" if every and progress.global_step % every == 0 else None

    def eval_due(self) -> str | None:
        return self._due(self.config.eval_every)

    def eval_missed(self) -> str | None:
        """The eval due at the step a resume starts from, if the run has none there: a stop saves without it (a
        scheduler's grace period may not cover a whole evaluation), and an --extend may end the run at any step."""
        return self.eval_due() if self.record.last_eval_at(self.progress.global_step) is None else None

    def record_eval(self, label: str, result: EvalResult) -> None:
        entry = {"label": label, "step": self.progress.global_step, "epoch": self.progress.epoch, **asdict(result)}
        self.log.write("eval", **entry)
        self.record.results["evals"].append(entry)
        if label == "before":
            self.record.results["before"] = asdict(result)
        self._write_record()
        at = "" if label == f"step {entry['step']}" else f" step {entry['step']}:"
        self.say(f"[{label}]{at} perplexity {result.perplexity:.3f} (reference-style "
                 f"{result.reference_perplexity:.3f}), loss {result.loss:.4f}, masked-token accuracy "
                 f"{result.accuracy:.2%}")
        self.meter.restart_clock()  # tokens/s counts training only

    def record_fill_mask(self, label: str, prompts: list[str], predictions: list) -> None:
        """predictions: per prompt, per [MASK], the top-k (token, score) pairs."""
        for prompt, per_mask in zip(prompts, predictions):
            # Six places: kept to four and printed to three, a score was rounded twice (0.00551 printed as 0.005).
            tokens = [[(p.token, round(p.score, 6)) for p in top_k] for top_k in per_mask]
            self.log.write("fill_mask", label=label, step=self.progress.global_step, prompt=prompt, predictions=tokens)
            self.record.results["fill_mask"][label].append({"prompt": prompt, "predictions": tokens})
            self.say(f"[{label}] {prompt} -> " + " | ".join(", ".join(f"{p.token} {p.score:.3f}" for p in top_k)
                                                            for top_k in per_mask))  # as mlm-evaluate prints them
        self._write_record()
        self.meter.restart_clock()

    def save_if_due(self) -> None:
        """The checkpointer: a resumable checkpoint of finite weights every --save-every steps, at each epoch's end,
        at the last step and when the processes agreed to stop (written by the main process; every one waits)."""
        if not (self._due(self.config.save_every) or self.stop_requested):
            return
        # Logs check the loss only every --log-every steps: a save in between must not keep NaN weights.
        if not math.isfinite(float(self.meter.loss_sum)):
            raise self._non_finite("The training loss became non-finite")
        if not bool(torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()):
            raise self._non_finite("The weights became non-finite")
        rng_states = self.procs.gather_rng_states()  # every process takes part
        if self.procs.is_main:
            self._note_progress()
            self.folder.writes("checkpoints")
            with self._writing(f"the checkpoint of step {self.progress.global_step}"):
                self.last_checkpoint = str(save_training_checkpoint(
                    self.output_dir, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                    progress=self.progress, tokenizer=self.tokenizer, keep_last=self.config.keep_checkpoints,
                    rng_states=rng_states, record_json=self.record.to_json()))
            self.folder.commit()
            self._write_record()
        self.last_checkpoint = self.procs.gather(self.last_checkpoint)[0]  # all wait for it, and know it for a hint
        self.meter.restart_clock()

    # -- the end ---------------------------------------------------------------------------------------------

    def finish(self) -> RunSummary:
        """The final model in the Hub layout, the finished record and the model card."""
        self.console.close()
        main = self.procs.is_main
        if main:
            for name in (CONFIG_FILE, WEIGHTS_FILE, *self.tokenizer.saved_files):
                self.folder.writes(name)
            # The model's step too, for a later resume from before it (even if this segment never ends "finished").
            self.record.segments[-1]["final_model"] = self.progress.global_step
            self._write_record()  # the names first: a kill while saving leaves no file the record does not list
            with self._writing("the final model"):
                save_pretrained(self.model, self.output_dir, tokenizer=self.tokenizer)
            share_final_weights(self.output_dir, self.last_checkpoint)
            self.folder.commit()
        self.record.results["after"] = self.record.last_eval_at(self.progress.global_step)
        self._end("finished")
        if main and not self.folder.may_replace(CARD_FILE):
            self.say(f"note: kept {self.output_dir / CARD_FILE}, which this run did not write; its model card was not "
                     "written (mlm.run.model_card.write_run_model_card(folder) writes it where you want).")
        elif main:  # README.md, pushed or not: the Hub shows it as the model's page
            try:
                card = write_run_model_card(self.output_dir, model_id=self.config.hub_model_id or str(self.output_dir))
            except (MLMError, OSError) as err:  # the run is finished, its model saved: a card it cannot write is a note
                (self.output_dir / CARD_FILE).unlink(missing_ok=True)  # an earlier segment's: its figures are not these
                self.say(f"note: the model card was not written ({err}); the run is finished and its model saved.")
            else:
                self.folder.writes(CARD_FILE, file_sha256(card))
                self._write_record()
        return self._close()

    def stopped(self) -> RunSummary:
        """The loop stopped on a signal, after saving a checkpoint."""
        self.console.close()
        self._end(f"interrupted by {self.stopped_by}")
        return self._close()

    def _end(self, how: str) -> None:
        self._note_progress()
        self.record.end_segment(how, step=self.progress.global_step)
        self._write_record()

    def nothing_to_do(self) -> RunSummary:
        """--resume of a finished run: a flag that would change the run is refused all the same."""
        settings = {**settings_as_json(self.config), "global_batch": self.config.global_batch(self.procs.world_size)}
        compare_settings(self.record.settings, settings, extend=self.config.extend, where=self.output_dir,
                         world_size=self.procs.world_size)
        if given := [name for name in ("dataset", "validation_file")
                     if getattr(self.config, name) != self.record.settings.get(name)]:
            self.say(f"note: --{given[0].replace('_', '-')} {getattr(self.config, given[0])} is not read: the run "
                     f"is finished (to train its model on other data, start a new run from it: --model "
                     f"{self.output_dir}).")
        longer = "--max-steps" if self.record.settings.get("max_steps") is not None else "--epochs"
        self.say(f"{self.output_dir} holds a finished run: nothing to do (to train it for longer, resume it with "
                 f"--extend and a larger {longer}).")  # said, not raised: no error turns settings into flags here
        self.record = read_record(self.output_dir)
        return self._close()

    def _close(self) -> RunSummary:
        if self.log is not None:
            self.log.close()
        results, progress = self.record.results, self.record.progress
        return RunSummary(
            status="finished" if self.record.finished else "interrupted", output_dir=str(self.output_dir),
            steps=progress["step"], before=EvalResult(**results["before"]) if results["before"] else None,
            after=EvalResult(**results["after"]) if results["after"] else None, train_seconds=progress["train_seconds"],
            train_tokens_per_second=progress["train_tokens"] / max(progress["train_seconds"], 1e-9),
            checkpoint=self.last_checkpoint, stopped_by=self.stopped_by, is_main=self.procs.is_main)

    def end_with(self, err: BaseException, how: str | None = None) -> None:
        """The run ends on an exception: record `how` (once it has a checkpoint), or undo what it wrote."""
        if self.log is not None and self.procs.is_main and self.folder.committed:
            stop = isinstance(err, KeyboardInterrupt)
            how = how or (f"interrupted by {getattr(err, 'signal_name', 'SIGINT')}" if stop else "failed")
            self.record.end_segment(how, step=self.progress.global_step)
            with suppress(MLMError):  # the error being raised says more than this one
                self._write_record()
        self.folder.abandon()  # before the first checkpoint: the folder goes back to how it was

    def continue_hint(self) -> str:
        if self.record is not None and self.record.finished and self.log is not None:  # stopped writing the card
            return f"The run had finished, its model saved in {self.output_dir}; only its model card was not written."
        if self.last_checkpoint is not None:
            # Stopped before a checkpoint of its own, a resume continues the checkpoint it was given: `--resume latest`
            # would take a newer one of the folder, which the user did not ask for.
            newest = checkpoints[-1].resolve() if (checkpoints := list_checkpoints(self.output_dir)) else None
            given = self.last_checkpoint == str(self.resume_from) and newest != self.resume_from.resolve()
            return f"Continue with: {resume_command(self.output_dir, self.procs, self.resume_from if given else None)}"
        # This run saved no checkpoint and resumes none: the folder is as it was. A chunk store cut short keeps its
        # completed pieces (mlm/corpus_store.py): say so, or users redo it.
        if self.log is None:  # stopped while setting up
            return ("Nothing was saved: the output folder is as it was; data prepared so far is kept, and the same "
                    "command continues its preparation.")
        return ("Nothing was saved: the run stopped before its first checkpoint (--save-every), and the output folder "
                "is as it was. The same command starts it again, on the data already prepared.")

    def _note_progress(self) -> None:
        self.record.progress = {"step": self.progress.global_step, "train_seconds": self.meter.train_seconds,
                                "train_tokens": self.meter.total_tokens}

    def _write_record(self) -> None:
        if self.procs.is_main:
            self.folder.writes(RECORD_FILE)
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
                        f"({where}). Try a lower `lr`, `precision` bf16 or fp32, or warmup.")


def settings_as_json(config: TrainConfig) -> dict:
    """Every field of `config`, JSON-able (tuples become lists, as they come back from run.json)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(config).items()}


def run_length(settings: dict) -> tuple[str, int]:
    """What sets a run's length: `max_steps` when given (it overrides `epochs`), else `epochs`."""
    name = "epochs" if settings.get("max_steps") is None else "max_steps"
    return name, settings.get(name)


def compare_settings(stored: dict, current: dict, *, extend: bool, where: Path, world_size: int) -> dict:
    """Refuse a resume whose settings change the run (RUN_SETTINGS), listing every difference; return the changes
    allowed (how to run, where the model and data are, the length with `extend`) as {name: [before, now]}."""
    compared = [name for name in RUN_SETTINGS
                if name not in WHERE_SETTINGS and (name not in LENGTH_SETTINGS or not extend)]
    if differ := [name for name in compared if name in stored and stored[name] != current.get(name)]:
        listed = "; ".join(_difference(name, stored, current, world_size) for name in differ)
        hint = " To train for longer (or shorter), add `extend`." if set(differ) & set(LENGTH_SETTINGS) else ""
        raise MLMError(f"`resume` would change the run in {where}: {listed}. Resume without these changes (the run "
                       f"record, run.json, has its settings), or start a new run in another output folder.{hint}")
    return {name: [stored[name], value] for name, value in current.items()
            if name in stored and stored[name] != value and name not in compared and name not in HOW_TO_RESUME}


def _difference(name: str, stored: dict, current: dict, world_size: int) -> str:
    if name != "global_batch":
        return f"`{name}` " + " -> ".join("unset" if v is None else repr(v) for v in (stored[name], current.get(name)))
    batch, accum = current["batch_size"], current["grad_accum"]
    keep = stored[name] // world_size
    ways = [f"`batch_size` {keep // accum}" if keep % accum == 0 else None,
            f"`grad_accum` {keep // batch}" if keep % batch == 0 else None]
    how = " or ".join(way for way in ways if way) if stored[name] % world_size == 0 else None
    return (f"the global batch (batch_size x grad_accum x processes) {stored[name]} -> {current[name]} "
            f"({batch} x {accum} x {world_size})" + (f"; keep {stored[name]} with {how}" if how else ""))


def data_file_digests(config: TrainConfig) -> dict:
    """{name relative to the data's common folder: sha256} of every file the run reads: a resume must see the same
    bytes (wherever the folder is now), or it would train and score on other text."""
    train, held_out = run_sources(config.dataset, train_splits=config.train_splits, eval_split=config.eval_split,
                                  validation_file=config.validation_file)
    files = [file for source, split in train + ([held_out] if held_out else [])
             for file in find_data_files(source, split)]
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return {str(f.relative_to(root)): file_sha256(f) for f in files}


def compare_data(stored: dict, current: dict) -> None:
    """The run's data files ({name: sha256}, in the order the run reads them: its training files, then its eval ones)
    against those found now: the same bytes in the same order and roles. The names may differ, being relative to the
    files' common folder, which a validation file or dataset moved on its own changes."""
    now = list(current.values())
    if now == list(stored.values()):
        return
    if sorted(now) == sorted(stored.values()):
        raise MLMError("The data files are the run's, but in other roles or order (`dataset` and `validation_file` "
                       "exchanged, or files renamed): give them as the run did.")
    if not set(now) & set(stored.values()) and list(current) != list(stored):  # other files, not edited ones
        raise MLMError(f"The data is not the run's: none of its files holds the bytes of one the run started with "
                       f"({listed(list(stored), 2)}). Give the run's data: run.json names its `dataset` and "
                       "`validation_file`.")
    if len(now) == len(stored):  # file by file, in order: the names of moved files differ
        name = next(name for (name, digest), then in zip(stored.items(), now) if then != digest)
        raise MLMError(f"The data file {name} changed since the run started (its sha256 differs): the run would train "
                       "and score on other text. Restore it, or start a new run in another output folder.")
    if missing := [name for name in stored if name not in current]:
        raise MLMError(f"The data file {missing[0]} is missing: the run would train and score on other text. Restore "
                       "it, or start a new run in another output folder.")
    raise MLMError(f"The data now holds {sorted(set(current) - set(stored))[0]}, which the run did not start with. "
                   "Remove it, or start a new run in another output folder.")


def share_final_weights(output_dir: Path, checkpoint: str | None) -> None:
    """The last checkpoint holds the same weights as the final model: make its model.safetensors a hard link to
    the final one, so a finished folder stores them once. The bytes, hence the manifest, are unchanged."""
    if checkpoint is None:
        return
    final, saved = output_dir / WEIGHTS_FILE, Path(checkpoint) / WEIGHTS_FILE
    with suppress(OSError):  # a file system without hard links: two copies
        if saved.stat().st_size == final.stat().st_size and file_sha256(saved) == file_sha256(final):
            (link := saved.with_name(".model.safetensors.link")).unlink(missing_ok=True)
            os.link(final, link)
            os.replace(link, saved)


def resume_command(output_dir: Path, procs: Processes, checkpoint: Path | None = None) -> str:
    """The command that continues the run, to copy as it is: every setting comes from the run record. It resumes
    `checkpoint`, else the newest one."""
    flags = f"--resume {shlex.quote(str(checkpoint or 'latest'))} --output-dir {shlex.quote(str(output_dir))}"
    if procs.world_size == 1:
        return f"mlm-train {flags}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", procs.world_size))
    nodes = procs.world_size // max(per_node, 1)
    # torchrun's default rendezvous is static, where every node would be node 0: name c10d's, with the first node's
    # address (HOST:PORT) and the run's id (torchrun tells its processes the id, not the endpoint).
    launch = (f"torchrun --nproc_per_node {per_node}" if nodes == 1 else
              f"on each of the {nodes} nodes, torchrun --nnodes {nodes} --nproc_per_node {per_node} --rdzv_backend "
              f"c10d --rdzv_endpoint HOST:PORT --rdzv_id {os.environ.get('TORCHELASTIC_RUN_ID', 'JOB')}")
    return f"{launch} -m mlm.cli.train {flags}"
