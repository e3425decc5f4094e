"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `<output_dir>/checkpoints/step-000123/` holding

    config.json, model.safetensors, tokenizer files   the model, in the Hub layout (fill_mask.py can load it)
    optimizer.safetensors                             AdamW's moment estimates and step counts, and every
                                                      process's dropout RNG states
    trainer_state.json                                position in the run, param-group settings, GradScaler
    run.json                                          the run record as of this step (mlm/run/record.py)
    manifest.json                                     size and sha256 of every other file, written last

Nothing is pickled: tensors go to safetensors, everything else to JSON. A checkpoint is first written to a
hidden temporary folder and then renamed into place, so a crash or Ctrl-C mid-save never leaves a half-written
checkpoint that --resume would pick up. The manifest catches what the rename cannot: a file damaged later (a bad
copy, a disk error, a hand edit) still parses, but no longer matches its checksum, and --resume refuses it; a
checkpoint without its manifest is refused too, since nothing could then vouch for its files.
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
from mlm.files.pretrained import (
    config_to_dict,
    model_from_state_dict,
    read_config,
    read_safetensors,
    save_pretrained,
)
from mlm.files.writes import normal_permissions
from mlm.model import DistilBertForMaskedLM

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
RECORD_COPY = "run.json"  # mlm.run.record.RECORD_FILE
REQUIRED_FILES = {"config.json", "model.safetensors", OPTIMIZER_FILE, STATE_FILE, RECORD_COPY}
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"


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

    def as_json(self) -> dict:
        return {**asdict(self), "schedule_step": int(self.schedule_step)}


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_training_checkpoint(
    output_dir: Path,
    *,
    model: DistilBertForMaskedLM,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    tokenizer=None,
    keep_last: int | None = None,
    rng_states: dict[str, torch.Tensor],
    record_json: str,
) -> Path:
    """Write step-<global_step>/ atomically, then delete all but the newest `keep_last` checkpoints.
    `rng_states` are every process's (mlm.run.processes.gather_rng_states); `record_json` is the run record."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.global_step:06d}"
    if final.exists():  # already saved at this step (e.g. an interrupt right after a periodic save)
        return final
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{TMP_PREFIX}{final.name}-"))
    try:
        normal_permissions(tmp, directory=True)  # mkdtemp makes it private (0700); a run's files are not
        save_pretrained(model, tmp, tokenizer=tokenizer)
        tensors, groups = _optimizer_to_tensors(optimizer)
        tensors.update(rng_states)
        save_file(tensors, tmp / OPTIMIZER_FILE)
        normal_permissions(tmp / OPTIMIZER_FILE)  # safetensors renames its own private (0600) temporary file
        state = {
            "progress": progress.as_json(),
            "param_groups": groups,
            "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        (tmp / RECORD_COPY).write_text(record_json)
        _write_manifest(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Delete the temporary folders of checkpoint saves that a crash interrupted; return them. Only call this
    while holding the output folder's lock: another run's save in progress looks the same."""
    root = checkpoint_dir(output_dir)
    stale = sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def load_training_checkpoint(
    path: Path,
    *,
    model: DistilBertForMaskedLM,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> tuple[Progress, dict[str, torch.Tensor]]:
    """Restore model weights, optimizer and GradScaler from `path` in place; return the position and the
    checkpoint's RNG states (each process restores its own: mlm.run.processes.restore_rng_state)."""
    path = Path(path)
    state = read_state(path)
    saved = model_from_state_dict(
        read_config(path / "config.json"), read_safetensors(path / "model.safetensors"),
        source=path,
    )
    if config_to_dict(saved.config) != config_to_dict(model.config):
        raise MLMError(f"{path} holds a model with another configuration than this run's: resume with the "
                       "same --model (and --init) as the run that wrote it.")
    bad = [name for name, tensor in saved.state_dict().items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}).")
    with torch.no_grad():
        for target, source in zip(model.state_dict().values(), saved.state_dict().values()):
            target.copy_(source)

    tensors = read_safetensors(path / OPTIMIZER_FILE)
    optimizer.load_state_dict(_optimizer_from_tensors(tensors, state["param_groups"]))
    if scaler is not None and state["grad_scaler"] is not None:
        scaler.load_state_dict(state["grad_scaler"])
    rng = {name: tensor for name, tensor in tensors.items() if name.startswith("rng.")}
    return Progress(**state["progress"]), rng


class CheckpointError(MLMError):
    """A checkpoint that must not be resumed from: damaged, incomplete or holding non-finite values."""


def read_state(path: Path) -> dict:
    """trainer_state.json of the checkpoint `path`, checked for the shape this module writes."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise MLMError(f"{path} is not a training checkpoint (no {STATE_FILE}); pass a step-NNNNNN folder.")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is unreadable ({err}).") from None
    progress_keys = {f.name for f in fields(Progress)}
    shape_ok = (
        isinstance(state, dict)
        and isinstance(state.get("progress"), dict) and set(state["progress"]) == progress_keys
        and all(isinstance(value, int) and not isinstance(value, bool) and value >= 0
                for value in state["progress"].values())
        and isinstance(state.get("param_groups"), list) and all(isinstance(g, dict) for g in state["param_groups"])
        and (state.get("grad_scaler") is None or isinstance(state["grad_scaler"], dict))
    )
    if not shape_ok:
        raise CheckpointError(f"{file} does not have the layout of an mlm trainer state (progress, param_groups, "
                              "grad_scaler).")
    return state


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` has its manifest and every file it lists is there with its size and
    sha256."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}, so nothing vouches for its files (a checkpoint gets one "
                              "when its save completes).")
    try:
        files = json.loads(manifest_file.read_text(encoding="utf-8"))["files"]
        entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{manifest_file} is unreadable ({type(err).__name__}: {err}).") from None
    listed = {name for name, _, _ in entries}
    if not REQUIRED_FILES <= listed or any("/" in name or name.startswith(".") for name in listed):
        raise CheckpointError(f"{manifest_file} does not list a checkpoint's files ({', '.join(sorted(REQUIRED_FILES))}"
                              ", each by its plain name).")
    for name, size, digest in entries:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing.")
        if file.stat().st_size != size or file_sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (damaged or modified since saved).")


def newest_good_checkpoint(output_dir: Path, *, before_step: int | None = None) -> Path | None:
    """The newest checkpoint of `output_dir` (older than step `before_step`, if given) that passes
    verify_checkpoint and holds finite weights, or None."""
    for candidate in reversed(list_checkpoints(output_dir)):
        if before_step is not None and checkpoint_step(candidate) >= before_step:
            continue
        try:
            verify_checkpoint(candidate)
            weights = read_safetensors(candidate / "model.safetensors")
        except MLMError:
            continue
        if all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point()):
            return candidate
    return None


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else -1


def _write_manifest(folder: Path) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2) + "\n")


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split optimizer.state_dict() into named tensors (for safetensors) and JSON-able param-group settings."""
    state_dict = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{name}": value.detach().cpu().contiguous()
        for index, per_param in state_dict["state"].items()
        for name, value in per_param.items()
    }
    groups = [
        {key: (value.item() if isinstance(value, torch.Tensor) else value) for key, value in group.items()}
        for group in state_dict["param_groups"]
    ]
    return tensors, groups


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    # JSON turned the betas tuple into a list; AdamW expects a tuple.
    groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in groups]
    return {"state": state, "param_groups": groups}
