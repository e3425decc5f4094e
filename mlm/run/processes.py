"""Processes and devices, precision, and each process's random state: what a run needs around the model.
None of it knows about DistilBERT or masking."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


def gather_rng_states(procs: Processes, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's dropout generators, for rank 0 to store in a checkpoint: {"rng.rank{r}.cpu": (S,) uint8,
    "rng.rank{r}.cuda": (S,) uint8 on a GPU}. Each process draws its own dropout masks, so a resume that
    restored rank 0's state alone would give the other ranks new streams, and other weights."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    gathered = {}
    for kind, state in sorted(states.items()):
        if procs.world_size == 1:
            parts = [state]
        else:  # NCCL moves GPU tensors only; the states are fixed-size byte tensors, the same size on every rank
            local = state.to(device)
            parts = [torch.empty_like(local) for _ in range(procs.world_size)]
            dist.all_gather(parts, local)
        gathered.update({f"rng.rank{rank}.{kind}": part.cpu() for rank, part in enumerate(parts)})
    return gathered


def restore_rng_state(tensors: dict[str, torch.Tensor], procs: Processes, device: torch.device) -> bool:
    """Set this process's dropout generators from a checkpoint's tensors; False if it holds none for this rank."""
    cpu = tensors.get(f"rng.rank{procs.rank}.cpu")
    if cpu is None:
        return False
    torch.set_rng_state(cpu)
    cuda = tensors.get(f"rng.rank{procs.rank}.cuda")
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    return True


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
