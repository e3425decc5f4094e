"""The metrics log (metrics.jsonl) and the meter behind its training lines: loss, tokens/s, time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed at once so that `tail -f` and crashes see every line.

    `listeners` (objects with write(kind, **values) and close()) get every record too, e.g. TensorBoard's.
    """

    def __init__(self, path: Path, enabled: bool, segment: int = 0, listeners: tuple = ()):
        # segment: 0 for a run's first process, k for its k-th resume; a `resume` line opens each new segment.
        self.path, self.enabled, self.segment, self.listeners = path, enabled, segment, listeners

    def write(self, kind: str, **values) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"kind": kind, "time": round(time.time(), 3), "segment": self.segment,
                                         **values}) + "\n")
            for listener in self.listeners:
                listener.write(kind, **values)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


class Meter:
    """Loss, tokens and time since the last log, and the whole run's training time and tokens."""

    def __init__(self, device: torch.device, *, seconds: float = 0.0, tokens: int = 0):
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: read back once per log interval
        self.ran = torch.zeros((), dtype=torch.int64, device=device)  # steps that updated the weights, likewise
        self.steps = self.tokens = 0
        self.seconds = 0.0
        self.train_seconds, self.total_tokens = seconds, tokens  # the run's, earlier segments included
        self.clock = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int, ran: int | torch.Tensor = 1) -> None:
        now = time.perf_counter()
        self.seconds += now - self.clock
        self.train_seconds += now - self.clock
        self.clock = now
        self.loss_sum += loss
        self.ran += ran
        self.steps += 1
        self.tokens += tokens
        self.total_tokens += tokens

    def restart_clock(self) -> None:
        """Start timing anew, so that what ran since the last step (eval, checkpoint) is not counted."""
        self.clock = time.perf_counter()

    def start_interval(self) -> None:
        self.loss_sum.zero_()
        self.ran.zero_()
        self.steps, self.tokens, self.seconds = 0, 0, 0.0

    def skipped(self) -> int:
        """Steps of the interval whose update fp16's GradScaler skipped (a host read)."""
        return self.steps - int(self.ran)

    def interval_tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def tokens_per_second(self) -> float:
        return self.total_tokens / self.train_seconds if self.train_seconds else 0.0
