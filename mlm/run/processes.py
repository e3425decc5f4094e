"""Processes and devices, and each process's random state: what a run needs around the model, not knowing it."""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlm.errors import MLMError


@dataclass
class Processes:
    """This process's place among the run's processes (torchrun's RANK and WORLD_SIZE), and its device.
    Every collective below is a plain return value in a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, value) -> list:
        """Every process's `value` (picklable: tensors on the CPU), by rank."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def agree_on_signal(self, received: str | None) -> str | None:
        """The stop signal a process received (the highest-numbered, if several did), or None: every process then
        stops at this step, and the record names the signal. A host sync on a GPU: call it at the same steps in every
        process, not at each one."""
        return max(filter(None, self.gather(received)), key=lambda name: signal.Signals[name].value, default=None)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather_interleaved(self, rows: torch.Tensor) -> torch.Tensor:
        """Process r's `rows` (n_r, C) CPU float64 hold rows r, r + world_size, r + 2 world_size, … of a table:
        every process gets the whole table back, in row order."""
        parts = self.gather(rows)
        table = torch.empty((sum(map(len, parts)), rows.shape[1]), dtype=rows.dtype)
        for rank, part in enumerate(parts):
            table[rank :: self.world_size] = part
        return table

    def gather_rng_states(self) -> dict[str, torch.Tensor]:
        """Every process's dropout generators, for rank 0 to store in a checkpoint: {"rng.rank{r}.cpu": (S,) uint8,
        "rng.rank{r}.cuda": (S,) uint8 on a GPU}. Each process draws its own dropout masks, so a resume that
        restored rank 0's state alone would give the other ranks new streams, and other weights."""
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return {f"rng.rank{rank}.{kind}": state for rank, theirs in enumerate(self.gather(states))
                for kind, state in sorted(theirs.items())}

    def restore_rng_state(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Set this process's dropout generators from a checkpoint's tensors; False if it holds none for this rank."""
        cpu, cuda = tensors.get(f"rng.rank{self.rank}.cpu"), tensors.get(f"rng.rank{self.rank}.cuda")
        if cpu is None:
            return False
        torch.set_rng_state(cpu)
        if cuda is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, self.device)
        return True


def start_processes(device_choice: str) -> Processes:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), and pick this process's device."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_choice)
    if device.type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", 0)) if world_size > 1 else device.index
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index)  # set_device: an index
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # NCCL between GPUs; gloo lets the same code run (and be tested) with CPU processes.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world_size, device)


def pick_device(choice: str) -> torch.device:
    """auto (a GPU when torch sees one), cpu, cuda or cuda:N, checked."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu(:0)?|cuda(:(0|[1-9][0-9]*))?", choice):
        raise MLMError(f"`device` {choice!r} is not a device mlm runs on: use auto, cpu, cuda or cuda:N.")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MLMError(f"`device` {choice} was asked for, but torch sees no CUDA GPU. Use cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MLMError(f"`device` {choice}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0.")
    return device


def lost_a_process(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another process of the run ended (killed, or stopped at once
    by a second Ctrl-C): gloo raises a plain RuntimeError naming the lost connection, NCCL the remote process that
    exited. A timeout is not one: every process may still be alive, hanging."""
    lost = r"connection (reset|closed) by peer|remote process exited|peer (process )?(has )?(closed|exited)"
    return isinstance(err, RuntimeError) and re.search(lost, str(err), re.IGNORECASE) is not None


def end_processes(procs: Processes) -> None:
    if procs.world_size > 1:
        dist.destroy_process_group()
