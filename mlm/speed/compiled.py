"""--compile and --cuda-graphs: the training step compiled by torch.compile, and replayed as a CUDA graph.

Both change how the step runs, not what it computes. CUDA graphs record one graph per distinct tensor shape,
so the labelled positions of a micro-batch are padded to a multiple of CUDA_GRAPH_PADDING: a few lengths occur
in a run instead of one per step.
"""

from __future__ import annotations

import torch
from torch import nn

from mlm.run.processes import Processes
from mlm.settings import TrainConfig

CUDA_GRAPH_PADDING = 256


def pad_positions(labelled: torch.Tensor, multiple: int) -> torch.Tensor:
    """The flat indices of the True entries of `labelled` (M,) bool, padded to a multiple of `multiple` by
    repeating the first unlabelled index (whose label, -100, adds no loss): with CUDA graphs, every distinct
    length is another recorded graph, and a multiple of 256 leaves one or two lengths in a run."""
    positions = labelled.nonzero().squeeze(1)  # (N,)
    missing = -len(positions) % multiple
    unlabelled = (~labelled).nonzero()
    if missing == 0 or len(unlabelled) == 0:
        return positions
    return torch.cat([positions, unlabelled[0].expand(missing)])


def wrap_for_training(model: nn.Module, config: TrainConfig, procs: Processes, device: torch.device) -> nn.Module:
    """The module the steps call: DDP over several processes, compiled with --compile. `model` stays the plain
    module, which evaluation, fill-mask and checkpoints use."""
    if procs.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if config.cuda_graphs:
        # Static shapes, one graph per shape: few occur (full batches, an epoch's short last batch, one or two
        # padded label counts). Letting dynamo switch to dynamic shapes at the second shape costs far more.
        model = torch.compile(model, mode="reduce-overhead", dynamic=False)
    elif config.compile:
        model = torch.compile(model)
    return model


def move_to_device(micro_cpu: list[dict[str, torch.Tensor]], device: torch.device, *,
                   compiled: bool) -> list[dict[str, torch.Tensor]]:
    """The step's micro-batches on `device`; copies from pinned memory do not wait for the GPU."""
    micro = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_cpu]
    if compiled:  # the labelled count changes every step: one graph for any count from the start, no recompile
        for batch in micro:
            torch._dynamo.mark_dynamic(batch["label_positions"], 0)
    return micro
