"""--compile and --cuda-graphs: the training step compiled by torch.compile, and replayed as a CUDA graph.

Both change how the step runs, not what it computes. CUDA graphs record one graph per distinct tensor shape,
so the labelled positions of a micro-batch are padded to a multiple of CUDA_GRAPH_PADDING: a few lengths occur
in a run instead of one per step. `choose_path` decides which path a run takes (--cuda-graphs auto: graphs on one
GPU when the run is long enough to repay the compile).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from mlm.errors import MLMError
from mlm.settings import TrainConfig

CUDA_GRAPH_PADDING = 256
# --cuda-graphs auto records graphs only for runs of at least this many optimizer steps: below it, the compile's
# fixed cost is not repaid by the faster steps. A placeholder until scripts/gpu_check.sh measures the break-even
# (compile seconds over the per-step saving, its "graphs_break_even" figure); set it from that measurement.
GRAPHS_MIN_STEPS = 300


@dataclass(frozen=True)
class ExecutionPath:
    graphs: bool  # torch.compile mode="reduce-overhead": the step replayed as CUDA graphs
    compile: bool  # torch.compile without graphs (--compile)
    says: str  # one line for the run's first lines: which path, and why

    @property
    def padding(self) -> int:
        """Label positions are padded to a multiple of this (pad_positions): few shapes, few recorded graphs."""
        return CUDA_GRAPH_PADDING if self.graphs else 1


def choose_path(choice: str, *, device_type: str, world_size: int, total_steps: int, grad_accum: int = 1,
                lean: str = "auto", compile: bool = False) -> ExecutionPath:
    """How the training steps run, from --cuda-graphs off|on|auto and what the run is.

    on: CUDA graphs, or an MLMError where they cannot run (no GPU, several processes). auto: CUDA graphs on one
    GPU for runs of GRAPHS_MIN_STEPS steps or more, else the eager (or --compile) path, saying why in one line.
    """
    plain = (ExecutionPath(False, True, "torch.compile (--compile)") if compile
             else ExecutionPath(False, False, "eager"))
    if choice == "off":
        return ExecutionPath(plain.graphs, plain.compile, f"{plain.says} (--cuda-graphs off)")
    cannot = ("CUDA graphs need a CUDA GPU" if device_type != "cuda"
              else "CUDA graphs need one process (this run has several, under torchrun)" if world_size > 1
              else "CUDA graphs replay one forward and backward per step: --grad-accum > 1" if grad_accum > 1
              else "CUDA graphs pad label positions, which --lean on's loss does not accept" if lean == "on"
              else None)
    if choice == "on":
        if cannot:
            raise MLMError(f"--cuda-graphs on: {cannot}. Use --cuda-graphs off or auto.")
        return ExecutionPath(True, False, "CUDA graphs (--cuda-graphs on)")
    if cannot:
        return ExecutionPath(plain.graphs, plain.compile, f"{plain.says}: {cannot} (--cuda-graphs auto)")
    if total_steps < GRAPHS_MIN_STEPS:
        return ExecutionPath(plain.graphs, plain.compile,
                             f"{plain.says}: {total_steps} steps are too few to repay compiling CUDA graphs "
                             f"(--cuda-graphs auto records them from {GRAPHS_MIN_STEPS} steps; on forces them)")
    return ExecutionPath(True, False, f"CUDA graphs (--cuda-graphs auto: {total_steps} steps on one GPU; off runs "
                                      "eager)")


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


def path_for(config: TrainConfig, device_type: str, world_size: int, total_steps: int) -> ExecutionPath:
    """choose_path for a run's settings."""
    return choose_path(config.cuda_graphs, device_type=device_type, world_size=world_size, total_steps=total_steps,
                       grad_accum=config.grad_accum, lean=config.lean, compile=config.compile)


def wrap_for_training(model: nn.Module, path: ExecutionPath, world_size: int, device: torch.device) -> nn.Module:
    """The module the steps call: DDP over several processes, compiled on `path`'s terms. `model` stays the plain
    module, which fill-mask and checkpoints use."""
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if path.graphs:
        # Static shapes, one graph per shape: few occur (full batches, an epoch's short last batch, one or two
        # padded label counts). Letting dynamo switch to dynamic shapes at the second shape costs far more.
        model = torch.compile(model, mode="reduce-overhead", dynamic=False)
    elif path.compile:
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


def eval_path(train_model: nn.Module, path: ExecutionPath, world_size: int) -> dict:
    """evaluate's `forward` and `positions` for a run on `path`: the training step's compiled module, so that
    evaluation runs at training speed (in eval mode and without gradients it compiles, and records graphs, once
    more), with the label positions padded as in training. The plain model ({}) on the eager path, and under DDP,
    whose forward would make the ranks wait for each other at every eval batch."""
    if world_size > 1 or not (path.graphs or path.compile):
        return {}
    if not path.graphs:
        return {"forward": train_model}

    def replay(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()  # the previous batch's outputs have been read: reuse them
        return train_model(*args, **kwargs)

    return {"forward": replay, "positions": partial(pad_positions, multiple=path.padding)}
