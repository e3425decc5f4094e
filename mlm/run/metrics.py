"""What a run reports while it trains: metrics.jsonl, the meter (loss, tokens/s, MFU), the console."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
# Dense matmul peaks, FLOP/s, of the GPUs a run is likely on (their spec sheets, without sparsity): the MFU
# denominator, as nanoGPT and torchtitan compute it. Other devices (CPUs among them) report no MFU.
# A GPU's name must hold every word of a key ("NVIDIA H100 PCIe" is the PCIe card, not L4's "L40S"); first match.
PEAK_FLOPS = {"H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
              "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
              "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
              "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
              "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
              "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30e12},
              "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31e12}}


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed at once so that `tail -f` and crashes see every line.
    `listeners` (objects with write(kind, **values) and close(), e.g. TensorBoard's) get every record too;
    `segment` is 0 for a run's first process, k for its k-th resume."""

    def __init__(self, path: Path, enabled: bool, segment: int = 0, listeners: tuple = ()):
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
    """Loss, tokens and time since the last log (the interval), and the whole run's training time and tokens."""

    def __init__(self, device: torch.device, *, seconds: float = 0.0, tokens: int = 0):
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: read back once per log interval
        self.ran = torch.zeros((), dtype=torch.int64, device=device)  # steps that updated the weights, likewise
        self.train_seconds, self.total_tokens = seconds, tokens  # the run's, earlier segments included
        self.start_interval()
        self.restart_clock()

    def add(self, loss: torch.Tensor, tokens: int, ran: int | torch.Tensor = 1, labelled: int = 0) -> None:
        now = time.perf_counter()
        elapsed, self.clock = now - self.clock, now
        self.seconds, self.train_seconds = self.seconds + elapsed, self.train_seconds + elapsed
        self.loss_sum += loss
        self.ran += ran  # under fp16 0 for a step whose update the GradScaler skipped
        self.steps, self.tokens, self.labelled = self.steps + 1, self.tokens + tokens, self.labelled + labelled
        self.total_tokens += tokens

    def restart_clock(self) -> None:
        """Time anew: what ran since the last step (eval, checkpoint) is not training."""
        self.clock = time.perf_counter()

    def start_interval(self) -> None:
        self.loss_sum.zero_()
        self.ran.zero_()
        self.steps, self.tokens, self.labelled, self.seconds = 0, 0, 0, 0.0


def flops_per_token(config, seq_len: int, labelled_fraction: float = 1.0) -> float:
    """Training FLOPs per token of mlm/model.py (forward + backward = 3x forward, 2 FLOPs per multiply-add), matmuls
    only: per layer 4·D² (q, k, v, out) + 2·D·F (FFN) weights and 2·L·D for the attention scores and their
    application; plus the head's D² transform and D·V projection. Given labels the model runs the last block's output
    projection and feed-forward, and the head, at the labelled fraction of the tokens only (1.0: the reference's)."""
    d, f, v = config.dim, config.hidden_dim, config.vocab_size
    every_token = 3 * d * d + 2 * seq_len * d  # q, k, v and attention: every position, every layer
    selectable = d * d + 2 * d * f  # output projection and feed-forward
    layers = config.n_layers * every_token + (config.n_layers - 1 + labelled_fraction) * selectable
    return 3 * 2 * (layers + labelled_fraction * (d * d + d * v))


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    words = set(re.split(r"[\s_-]+", torch.cuda.get_device_name(device)))
    return next((peaks[precision] for gpu, peaks in PEAK_FLOPS.items() if set(gpu.split()) <= words), None)


class Console:
    """The run's lines for the user: on a terminal a progress bar that carries the latest figures, anywhere else
    (a log file, a job's output) or with --no-progress one plain line per log, never a bar's carriage returns.
    The bar starts at the run's first step, so its rate is the training's, not the set-up's."""

    def __init__(self, enabled: bool, progress_bar: bool, *, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done
        self.bars = enabled and progress_bar and sys.stderr.isatty()
        self.bar = None

    def step(self) -> None:
        if self.bars and self.bar is None:  # no bar graphic: at 80 columns it would squeeze out the figures
            self.bar = tqdm(total=self.total, initial=self.done, desc="train", unit="step", dynamic_ncols=True,
                            bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, values: dict) -> None:
        """values: epoch, loss, lr, grad_norm, tokens_per_second, mfu (None where unknown)."""
        if not self.enabled:
            return
        mfu = f", mfu {values['mfu']:.1%}" if values["mfu"] is not None else ""
        if self.bar is not None:
            return self.bar.set_postfix_str(f"loss {values['loss']:.4f}, lr {values['lr']:.2e}{mfu}")
        print(f"step {step}/{self.total}: epoch {values['epoch']:.2f}, loss {values['loss']:.4f}, "
              f"lr {values['lr']:.2e}, grad norm {values['grad_norm']:.3f}, "
              f"{values['tokens_per_second']:,.0f} tokens/s{mfu}", flush=True)

    def over(self, iterable, desc: str):
        """`iterable`, with a bar of its own on a terminal (evaluation's)."""
        return tqdm(iterable, desc=desc, unit="batch", leave=False, dynamic_ncols=True) if self.bars else iterable

    def say(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message) if self.bar is not None else print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
