"""What a training run needs around the model: processes and devices, precision, the metrics log and Ctrl-C
handling (the output folder is mlm/run/folder.py's). mlm/train.py uses these; none of them knows about DistilBERT
or masking."""

from __future__ import annotations

import inspect
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mlm.errors import MLMError

# ---------------------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device_choice: str) -> tuple[Processes, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), and pick this process's device."""
    procs = Processes(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_choice)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise MLMError(f"--device {device_choice!r} is not a device mlm trains on: use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MLMError(f"--device {device_choice} was asked for, but torch sees no CUDA GPU. Use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MLMError(f"--device {device_choice}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0.")
    if device.type == "cuda" and procs.world_size > 1:
        device = torch.device("cuda", procs.local_rank)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if procs.world_size > 1 and not dist.is_initialized():
        # NCCL between GPUs; gloo lets the same code run (and be tested) with CPU processes.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return procs, device


def end_processes(procs: Processes) -> None:
    if procs.world_size > 1:
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The sum over processes (in place), or `values` itself in a single process."""
    if procs.world_size > 1:
        dist.all_reduce(values)
    return values


def any_process(flag: bool, procs: Processes, device: torch.device) -> bool:
    """True if `flag` is set in any process. It reads the result back (a host sync on a GPU): call it at the same
    steps in every process, not at each one."""
    if procs.world_size == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device), procs).item())


def barrier(procs: Processes) -> None:
    if procs.world_size > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Precision


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None  # None: plain fp32
    scaler: torch.amp.GradScaler | None  # fp16 only


def pick_precision(choice: str, device: torch.device) -> Precision:
    """The precision for `choice` (auto | fp32 | bf16 | fp16) on `device`.

    auto: bf16 autocast on GPUs that run bf16 natively, else fp16 with loss scaling; fp32 on the CPU, where
    autocast is slower than fp32 on most CPUs. fp32 on a GPU is real fp32: TF32 matmuls stay off (torch's
    default), because --precision fp32 is the choice for exact results, and the fast choice is bf16.
    """
    if choice == "auto":
        choice = "fp32" if device.type != "cuda" else ("bf16" if _native_bf16() else "fp16")
    if choice == "fp32":
        return Precision("fp32", None, None)
    if choice == "bf16":
        return Precision("bf16", torch.bfloat16, None)  # bf16 has fp32's range: no loss scaling needed
    # fp16 overflows easily: scale the loss up and skip steps whose gradients overflow.
    return Precision("fp16", torch.float16, torch.amp.GradScaler(device.type))


def _native_bf16() -> bool:
    # torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (pre-Ampere GPUs), and slow.
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------------------------------------------------------
# The metrics log


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


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a flag the loop checks (then it checkpoints and exits).

    A second Ctrl-C raises KeyboardInterrupt at once, for when even that is too slow.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        tqdm.write(f"{self.signal_name} received: finishing this step (with several processes: up to the next "
                   "log step), then saving a checkpoint (Ctrl-C again to abort without saving).")
