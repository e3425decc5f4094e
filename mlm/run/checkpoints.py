"""Training checkpoints, `<output_dir>/checkpoints/step-000123/`: all a run needs to continue exactly where it stopped.

    config.json, model.safetensors, tokenizer files   the model, in the Hub layout (fill_mask.py can load it)
    optimizer.safetensors                             AdamW's moments and step counts, every process's RNG states
    trainer_state.json                                position in the run, param-group settings, GradScaler
    run.json                                          the run record as of this step (mlm/run/record.py)
    manifest.json                                     size and sha256 of every other file, written last

Nothing is pickled. A checkpoint is written to a hidden temporary folder, then renamed into place: a crash mid-save
never leaves a half-written one for --resume to pick up. The manifest catches what the rename cannot (a file damaged
later still parses, but fails its checksum); a checkpoint without one is refused, since nothing vouches for its files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlm.errors import MLMError
from mlm.files.hashing import file_sha256
from mlm.files.pretrained import config_to_dict, model_from_state_dict, read_config, read_safetensors, save_pretrained
from mlm.files.writes import normal_permissions

STATE_FILE, OPTIMIZER_FILE, MANIFEST_FILE = "trainer_state.json", "optimizer.safetensors", "manifest.json"
RECORD_COPY = "run.json"  # mlm.run.record.RECORD_FILE
REQUIRED_FILES = {"config.json", "model.safetensors", OPTIMIZER_FILE, STATE_FILE, RECORD_COPY}
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"


class CheckpointError(MLMError):
    """A checkpoint that must not be resumed from: damaged, incomplete or holding non-finite values."""


@dataclass
class Progress:
    """Where a run stands. Steps count optimizer steps (one per global batch, gradient accumulation included)."""

    epoch: int = 0  # the epoch in progress, 0-based
    step_in_epoch: int = 0  # steps of `epoch` already done; resuming starts at this batch of its permutation
    global_step: int = 0  # steps done in the whole run
    # steps that updated the weights (fp16 steps skipped for inf gradients excluded); under fp16 a () device tensor
    # once a step ran (mlm/speed/amp.py), read back for a checkpoint only
    schedule_step: int | torch.Tensor = 0

    def advance(self, *, ran: int | torch.Tensor, steps_in_epoch: int) -> None:
        """One optimizer step done; `ran` (0 or 1) says whether it updated the weights."""
        self.global_step += 1
        self.schedule_step += ran
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_in_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


def save_training_checkpoint(output_dir: Path, *, model, optimizer: torch.optim.Optimizer,
                             scaler: torch.amp.GradScaler | None, progress: Progress, tokenizer=None,
                             keep_last: int | None = None, rng_states: dict[str, torch.Tensor], record_json: str
                             ) -> Path:
    """Write step-<global_step>/ atomically, then delete all but the newest `keep_last` checkpoints. `rng_states`:
    every process's (Processes.gather_rng_states); `record_json`: the run record."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.global_step:06d}"
    if final.exists():  # already saved at this step (e.g. an interrupt right after a periodic save)
        return final
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{final.name}-"))
    try:
        normal_permissions(tmp, directory=True)  # mkdtemp makes it private (0700); a run's files are not
        save_pretrained(model, tmp, tokenizer=tokenizer)
        optimizer_state = optimizer.state_dict()
        tensors = {f"optimizer.{index}.{name}": value.detach().cpu().contiguous()
                   for index, per_param in optimizer_state["state"].items() for name, value in per_param.items()}
        save_file({**tensors, **rng_states}, tmp / OPTIMIZER_FILE)
        normal_permissions(tmp / OPTIMIZER_FILE)  # safetensors renames its own private (0600) temporary file
        groups = [{key: value.item() if isinstance(value, torch.Tensor) else value for key, value in group.items()}
                  for group in optimizer_state["param_groups"]]
        state = {"progress": {**asdict(progress), "schedule_step": int(progress.schedule_step)}, "param_groups": groups,
                 "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        (tmp / RECORD_COPY).write_text(record_json)
        _write_manifest(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep_last] if keep_last else ():
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(path: Path, *, model, optimizer: torch.optim.Optimizer,
                             scaler: torch.amp.GradScaler | None) -> tuple[Progress, dict[str, torch.Tensor]]:
    """Restore model weights, optimizer and GradScaler from `path` in place; return the position and the
    checkpoint's RNG states (each process restores its own: Processes.restore_rng_state)."""
    path = Path(path)
    state = read_state(path)
    saved = model_from_state_dict(read_config(path / "config.json"), read_safetensors(path / "model.safetensors"),
                                  source=path)
    if config_to_dict(saved.config) != config_to_dict(model.config):
        raise MLMError(f"{path} holds a model with another configuration than this run's: resume with the "
                       "same --model (and --init) as the run that wrote it.")
    if bad := _non_finite(weights := saved.state_dict()):
        raise CheckpointError(f"{path} holds non-finite weights ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}).")
    with torch.no_grad():
        for target, source in zip(model.state_dict().values(), weights.values()):
            target.copy_(source)
    tensors = read_safetensors(path / OPTIMIZER_FILE)
    run_settings = [(group["betas"], group["eps"], group["weight_decay"]) for group in optimizer.param_groups]
    try:
        moments = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value
        # JSON turned the betas tuple into a list; AdamW expects a tuple.
        groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group
                  for group in state["param_groups"]]
        optimizer.load_state_dict({"state": moments, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as err:  # torch's own checks: groups or moments of another model
        raise CheckpointError(f"{path / STATE_FILE} and {OPTIMIZER_FILE} do not fit this model's AdamW "
                              f"({err}).") from None
    # The groups' AdamW settings replace the run's own: any other than the record's would change the run silently.
    if [(group["betas"], group["eps"], group["weight_decay"]) for group in optimizer.param_groups] != run_settings:
        raise CheckpointError(f"{path / STATE_FILE} holds AdamW betas, epsilon or weight decay other than its run's.")
    if scaler is not None and state["grad_scaler"] is not None:
        scaler.load_state_dict(state["grad_scaler"])
    return Progress(**state["progress"]), {name: t for name, t in tensors.items() if name.startswith("rng.")}


def read_state(path: Path) -> dict:
    """trainer_state.json of the checkpoint `path`, checked for the shape this module writes."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise MLMError(f"{path} is not a training checkpoint (no {STATE_FILE}); pass a step-NNNNNN folder.")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is unreadable ({err}).") from None
    if not (isinstance(state, dict) and isinstance(progress := state.get("progress"), dict)
            and set(progress) == {f.name for f in fields(Progress)}
            and all(type(value) is int and value >= 0 for value in progress.values())
            and isinstance(state.get("param_groups"), list) and all(isinstance(g, dict) for g in state["param_groups"])
            and (state.get("grad_scaler") is None or isinstance(state["grad_scaler"], dict))):
        raise CheckpointError(f"{file} does not have the layout of an mlm trainer state (progress, param_groups, "
                              "grad_scaler).")
    return state


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` has its manifest and every file it lists, with its size and sha256."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}, so nothing vouches for its files (a checkpoint gets one "
                              "when its save completes).")
    try:
        entries = [(name, int(entry["bytes"]), str(entry["sha256"]))
                   for name, entry in json.loads(manifest.read_text(encoding="utf-8"))["files"].items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{manifest} is unreadable ({type(err).__name__}: {err}).") from None
    listed = {name for name, _, _ in entries}
    if not REQUIRED_FILES <= listed or any("/" in name or name.startswith(".") for name in listed):
        raise CheckpointError(f"{manifest} does not list a checkpoint's files ({', '.join(sorted(REQUIRED_FILES))}, "
                              "each by its plain name).")
    for name, size, digest in entries:
        if not (file := Path(path) / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing.")
        if file.stat().st_size != size or file_sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (damaged or modified since saved).")


def damaged(checkpoint: Path, err: Exception) -> MLMError:
    """The refusal of a damaged `checkpoint`, naming the newest older one that is intact with finite weights."""
    good = next((older for older in reversed(list_checkpoints(checkpoint.parent.parent))
                 if checkpoint_step(older) < checkpoint_step(checkpoint) and _intact(older)), None)
    fix = (f"The newest good checkpoint is {good}: resume with `resume` {good}" if good
           else "No older checkpoint of the run is intact: start again with `overwrite`")
    return MLMError(f"Not resuming from a damaged checkpoint: {err} {fix}, or restore {checkpoint.name} from a copy.")


def _intact(checkpoint: Path) -> bool:
    try:
        verify_checkpoint(checkpoint)
        return not _non_finite(read_safetensors(checkpoint / "model.safetensors"))
    except MLMError:
        return False


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save are ignored)."""
    found = (Path(output_dir) / "checkpoints").glob("step-*")  # nothing when there is no such folder
    return sorted((p for p in found if CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()),
                  key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else -1


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2) + "\n")
