"""The run record, `run.json`: one file that says everything about a run. It sits in the output folder, rewritten
atomically at every change, and a copy as of its step goes into every checkpoint. Resume, `mlm-evaluate --model
RUN_DIR`, the model card and the Hub push read it: nothing about a run needs retyping or guessing."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_type_hints

from mlm.errors import MLMError
from mlm.files.writes import atomic_write_text
from mlm.settings import misread_settings

RECORD_FILE = "run.json"
FORMAT = 1
STATUSES = ("running", "interrupted", "finished", "failed")


@dataclass
class RunRecord:
    settings: dict  # every TrainConfig field (and the global batch): what a resume continues with
    data: dict = field(default_factory=dict)  # {"files": {path: sha256}, "tokenizer_sha256": str}: edits refused
    world_size: int = 1  # a resume with another count trains the same masks but other dropout streams
    derived: dict = field(default_factory=dict)  # what the settings gave: chunks, steps, warmup steps, parameters
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # kept by every resume: tells checkpoints apart
    status: str = "running"  # one of STATUSES
    # "before", every eval, "after" once finished, and the fill-mask predictions before and after
    results: dict = field(default_factory=lambda: {"before": None, "evals": [], "after": None,
                                                   "fill_mask": {"before": [], "after": []}})
    # one per process run: times, steps, device, precision, its end, the step of the final model it saved if any
    segments: list = field(default_factory=list)
    progress: dict = field(default_factory=lambda: {"step": 0, "train_seconds": 0.0, "train_tokens": 0})
    # {name this run wrote in its folder: None, or README.md's sha256}: all the run removes or replaces (folder.py)
    written: dict = field(default_factory=dict)
    format: int = FORMAT

    def start_segment(self, *, step: int, **facts) -> None:
        """A process run of the run starts at `step`. facts: device, precision, model_variant, world_size, changed.
        Resuming from an earlier checkpoint redoes the later steps: their evals belong to the abandoned course."""
        for segment in self.segments:
            if segment["end"] == "running":  # its process was killed before it could say so
                segment["end"] = "killed"
        self.results["evals"] = [e for e in self.results["evals"] if e["label"] == "before" or e["step"] <= step]
        self.results["after"], self.results["fill_mask"]["after"] = None, []
        self.status, self.world_size = "running", facts["world_size"]
        self.segments.append({"started": _now(), "ended": None, "from_step": step, "to_step": None, "end": "running",
                              **facts})

    def end_segment(self, end: str, *, step: int) -> None:
        """end: finished | interrupted | failed, or the signal that stopped it (e.g. "interrupted by SIGTERM")."""
        if self.segments and self.segments[-1]["ended"] is None:  # a stop once the run has finished changes nothing
            self.status = end if end in STATUSES else "interrupted"
            self.segments[-1].update(ended=_now(), to_step=step, end=end)

    def last_eval_at(self, step: int) -> dict | None:
        """The last eval recorded at `step` (without its label, step and epoch), or None."""
        return next(({k: v for k, v in e.items() if k not in ("label", "step", "epoch")}
                     for e in reversed(self.results["evals"]) if e["step"] == step and e["label"] != "before"), None)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def final_model_step(self) -> int | None:
        """The step of the last final model the run saved in its folder, if any."""
        return next((segment["final_model"] for segment in reversed(self.segments) if "final_model" in segment), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def write_record(folder: Path, record: RunRecord) -> None:
    """`folder`/run.json, atomically: a crash leaves the old record or the new one, never half of one."""
    atomic_write_text(Path(folder) / RECORD_FILE, record.to_json())


def read_record(folder: Path) -> RunRecord | None:
    """The record in `folder` (an output folder or a checkpoint), None if it has none; MLMError if damaged."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    restore = f"restore it from the newest checkpoint's copy ({Path(folder) / 'checkpoints'}/step-*/{RECORD_FILE})"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MLMError(f"{path} is unreadable ({err}): {restore}.") from None
    if not _has_the_layout(data):
        raise MLMError(f"{path} is not an mlm run record (format {FORMAT}), or it was edited into another shape: "
                       f"{restore}, or start a new run in another output folder.")
    if misread := misread_settings(data["settings"]):
        raise MLMError(f"{path}: the value of {', '.join(misread)} in its settings is of the wrong type (edited by "
                       f"hand? a number written as a string, a list as text, a null): {restore}, or correct it.")
    return RunRecord(**data)


def _has_the_layout(data) -> bool:
    """The fields, types and nested shapes the run layer reads: a hand-edited record is refused in one line."""
    types = get_type_hints(RunRecord)
    if not (isinstance(data, dict) and {"settings", "format", "status"} <= set(data) <= set(types)
            and all(isinstance(data[name], kind) for name, kind in types.items() if name in data)):
        return False
    results, progress, evals = data.get("results", {}), data.get("progress", {}), data.get("results", {}).get("evals")
    files = data.get("data", {}).get("files", {})
    return (data["format"] == FORMAT and data["status"] in STATUSES and data.get("world_size", 1) >= 1
            and isinstance(files, dict) and all(isinstance(digest, str) for digest in files.values())
            and all(isinstance(s, dict) and isinstance(s.get("end"), str) for s in data.get("segments", []))
            and all(isinstance(progress.get(key, 0), int | float) and progress.get(key, 0) >= 0
                    for key in ("step", "train_seconds", "train_tokens"))
            and (not results or (isinstance(evals, list) and isinstance(results.get("fill_mask"), dict)
                                 and all(isinstance(e, dict) and isinstance(e.get("step"), int) for e in evals))))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
