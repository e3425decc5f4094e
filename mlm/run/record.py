"""The run record: `run.json`, one file that says everything about a run.

It sits in the output folder, rewritten atomically at every change, and a copy as of that step goes into every
checkpoint. Resume, `mlm-evaluate --model RUN_DIR`, the model card and the Hub push read it; nothing else about
a run needs retyping or guessing.

    run_id     a random id, kept by every resume: a checkpoint of another run is told apart
    status     running | interrupted | finished | failed
    settings   every TrainConfig field (and the global batch): what a resume continues with
    data       the sha256 of each data file and of the tokenizer: a resume refuses data edited since
    world_size processes; a resume with another count trains the same masks but other dropout streams
    derived    what the settings gave: chunks, steps, warmup steps, parameters
    results    "before", every eval, "after" once finished, and the fill-mask predictions before and after
    segments   one per process run of the run: start and end time, steps, device, precision, how it ended
    progress   steps done, training seconds and tokens over all segments
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mlm.errors import MLMError
from mlm.files.pretrained import atomic_write_text

RECORD_FILE = "run.json"
FORMAT = 1
STATUSES = ("running", "interrupted", "finished", "failed")


@dataclass
class RunRecord:
    settings: dict
    data: dict = field(default_factory=dict)  # {"files": {path: sha256}, "tokenizer_sha256": str}
    world_size: int = 1
    derived: dict = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "running"
    results: dict = field(default_factory=lambda: {"before": None, "evals": [], "after": None,
                                                   "fill_mask": {"before": [], "after": []}})
    segments: list = field(default_factory=list)
    progress: dict = field(default_factory=lambda: {"step": 0, "train_seconds": 0.0, "train_tokens": 0})
    format: int = FORMAT

    # -- what the run layer records ------------------------------------------------------------------------

    def start_segment(self, *, step: int, device: str, precision: str, model_variant: str, world_size: int,
                      changed: dict | None = None) -> None:
        self.status = "running"
        self.world_size = world_size
        self.segments.append({"started": _now(), "ended": None, "from_step": step, "to_step": None,
                              "end": "running", "device": device, "precision": precision,
                              "model_variant": model_variant, "world_size": world_size, "changed": changed or {}})

    def end_segment(self, end: str, *, step: int) -> None:
        """end: finished | interrupted | failed, or the signal that stopped it (e.g. "interrupted by SIGTERM")."""
        self.status = end if end in STATUSES else "interrupted"
        if self.segments and self.segments[-1]["ended"] is None:
            self.segments[-1].update(ended=_now(), to_step=step, end=end)

    def add_eval(self, label: str, step: int, epoch: int, result: dict) -> None:
        if label == "before":
            self.results["before"] = result
        self.results["evals"].append({"label": label, "step": step, "epoch": epoch, **result})

    def last_eval_at(self, step: int) -> dict | None:
        """The last eval recorded at `step` (without its label, step and epoch), or None."""
        for entry in reversed(self.results["evals"]):
            if entry["step"] == step and entry["label"] != "before":
                return {k: v for k, v in entry.items() if k not in ("label", "step", "epoch")}
        return None

    def keep_results_up_to(self, step: int) -> None:
        """Resuming from an earlier checkpoint redoes the later steps: their evals belong to the abandoned course."""
        self.results["evals"] = [e for e in self.results["evals"] if e["label"] == "before" or e["step"] <= step]
        self.results["after"] = None
        self.results["fill_mask"]["after"] = []

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def write_record(folder: Path, record: RunRecord) -> None:
    """Write `folder`/run.json atomically: a crash leaves the old record or the new one, never half of one."""
    atomic_write_text(Path(folder) / RECORD_FILE, record.to_json())


def read_record(folder: Path) -> RunRecord | None:
    """The record in `folder` (an output folder or a checkpoint), None if it has none; MLMError if damaged."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MLMError(f"{path} is unreadable ({err}): restore it from the newest checkpoint's copy "
                       f"({Path(folder) / 'checkpoints'}/step-*/{RECORD_FILE}).") from None
    known = {f.name for f in fields(RunRecord)}
    if (not isinstance(data, dict) or not isinstance(data.get("settings"), dict) or data.get("format") != FORMAT
            or data.get("status") not in STATUSES or not set(data) <= known):
        raise MLMError(f"{path} is not an mlm run record (format {FORMAT}): restore it from the newest checkpoint's "
                       "copy, or start a new run in another --output-dir.")
    return RunRecord(**data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
