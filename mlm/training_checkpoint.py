"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `<output_dir>/checkpoints/step-000123/` holding

    config.json, model.safetensors, tokenizer files   the model, in the Hub layout (fill_mask.py can load it)
    optimizer.safetensors                             AdamW's moment estimates and step counts, the RNG states
    trainer_state.json                                position in the run, param-group settings, GradScaler

Nothing is pickled: tensors go to safetensors, everything else to JSON. A checkpoint is first written to a
hidden temporary folder and then renamed into place, so a crash or Ctrl-C mid-save never leaves a half-written
checkpoint that --resume would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlm.checkpoint import model_from_state_dict, read_safetensors, save_pretrained
from mlm.errors import MLMError
from mlm.model import DistilBertConfig, DistilBertForMaskedLM

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Progress:
    """Where a run stands. Steps count optimizer steps (one per global batch, gradient accumulation included)."""

    epoch: int = 0  # the epoch in progress, 0-based
    step_in_epoch: int = 0  # steps of `epoch` already done; resuming starts at this batch of its permutation
    global_step: int = 0  # steps done in the whole run
    schedule_step: int = 0  # steps that updated the weights (fp16 steps skipped for inf gradients excluded)


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
) -> Path:
    """Write step-<global_step>/ atomically, then delete all but the newest `keep_last` checkpoints."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.global_step:06d}"
    if final.exists():  # already saved at this step (e.g. an interrupt right after a periodic save)
        return final
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    try:
        save_pretrained(model, tmp, tokenizer=tokenizer)
        tensors, groups = _optimizer_to_tensors(optimizer)
        tensors.update(_rng_states())
        save_file(tensors, tmp / OPTIMIZER_FILE)
        state = {
            "progress": asdict(progress),
            "param_groups": groups,
            "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
) -> Progress:
    """Restore model weights, optimizer, GradScaler and RNG states from `path` in place; return the position."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise MLMError(f"{path} is not a training checkpoint (no {STATE_FILE}); pass a step-NNNNNN folder.")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as err:
        raise MLMError(f"{path / STATE_FILE} is corrupt ({err}); resume from an older checkpoint.") from None

    saved = model_from_state_dict(
        DistilBertConfig.from_json_file(path / "config.json"), read_safetensors(path / "model.safetensors"),
        source=path,
    )
    if saved.config.to_dict() != model.config.to_dict():
        raise MLMError(f"{path} holds a model with another configuration than this run's: resume with the "
                       "same --model (and --init) as the run that wrote it.")
    with torch.no_grad():
        for target, source in zip(model.state_dict().values(), saved.state_dict().values()):
            target.copy_(source)

    tensors = read_safetensors(path / OPTIMIZER_FILE)
    optimizer.load_state_dict(_optimizer_from_tensors(tensors, state["param_groups"]))
    if scaler is not None and state["grad_scaler"] is not None:
        scaler.load_state_dict(state["grad_scaler"])
    _restore_rng_states(tensors)
    return Progress(**state["progress"])


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


def _rng_states() -> dict[str, torch.Tensor]:
    # Only dropout draws from the global generators (masks have their own, see mlm/train.py); restoring them
    # makes a resumed CPU run bit-identical to an uninterrupted one.
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _restore_rng_states(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
