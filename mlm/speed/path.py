"""The execution path: how a run executes the chapter's functions on its device, chosen once at set-up.

mlm/train.py builds the plain pieces (the model of mlm/model.py, `train_step`, the schedule, the tokenizer) and
hands each to the path, which returns it unchanged or wrapped:

    precision     fp32, bf16 autocast, or fp16 autocast with a GradScaler (--precision; auto picks by device)
    tokenizer     mlm/speed/fast_encode.py's exact shortcuts (--fast-tokenize on, the default)
    model         mlm/speed/lean.py's lean modules (--lean auto: on the CPU), then moved to the device
    learning rate under fp16 looked up on the device (mlm/speed/amp.py), so no step waits for the GPU
    step          on a GPU: label positions found on the host, DDP over several processes, torch.compile or CUDA
                  graphs (mlm/speed/compiled.py); on a CPU: train_step itself (DDP over several processes)

Each technique's module is imported only when the path takes it, so a run on the plain path (--smoke, the
walkthrough) executes no line of them. `says` is the line a run prints first: which path, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from mlm.errors import MLMError
from mlm.run.processes import Processes
from mlm.settings import TrainConfig

# --cuda-graphs auto records graphs only for runs of at least this many optimizer steps: below it, the compile's
# fixed cost is not repaid by the faster steps. scripts/gpu_check.sh measures the break-even (compile seconds over
# the per-step saving, its "graphs_break_even" figure) to check this value against.
GRAPHS_MIN_STEPS = 300


@dataclass(frozen=True)
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
        # torch.cuda.is_bf16_supported() alone also says yes where bf16 is only emulated (pre-Ampere GPUs), and slow.
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        choice = "fp32" if device.type != "cuda" else "bf16" if native_bf16 else "fp16"
    # fp16 overflows easily: scale the loss up and skip steps whose gradients overflow. bf16 has fp32's range: no
    # loss scaling needed.
    scaler = torch.amp.GradScaler(device.type) if choice == "fp16" else None
    return Precision(choice, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice], scaler)


@dataclass(frozen=True)
class ExecutionPath:
    device: torch.device
    world_size: int
    precision: Precision
    lean: bool
    fast_tokenize: bool
    compile: bool  # torch.compile without graphs (--compile)
    graphs_asked: str  # --cuda-graphs off | on | auto, decided by `for_steps`
    grad_accum: int
    says: str  # which model and path, and why, for the run's first lines and its record
    graphs: bool = False  # torch.compile mode="reduce-overhead": the step replayed as CUDA graphs

    @property
    def notes(self) -> list[str]:
        """Choices that work but cost the user time, said before the run starts."""
        if self.precision.name == "fp16" and self.device.type == "cpu":
            return ["fp16 on a CPU has no fast kernels: its steps run several times slower than fp32's "
                    "(--precision fp32 is the fast one there, and bf16 too only on CPUs with native bf16; fp16 is for "
                    "GPUs without bf16)."]
        return []

    def tokenizer(self, tokenizer):
        if not self.fast_tokenize:
            return tokenizer
        from mlm.speed.fast_encode import fast_tokenizer

        return fast_tokenizer(tokenizer)

    def for_steps(self, total_steps: int) -> ExecutionPath:
        """The path once the run's length is known: --cuda-graphs off | on | auto decided (see `graphs_choice`)."""
        graphs, why = graphs_choice(self, total_steps)
        return replace(self, graphs=graphs, says=f"{self.says}; steps run {why}")

    def model(self, model: nn.Module) -> nn.Module:
        if self.lean:
            from mlm.speed.lean import make_lean

            make_lean(model)
        return model.to(self.device)

    def learning_rate(self, learning_rate, total_steps: int):
        if self.precision.scaler is None:
            return learning_rate
        from mlm.speed.amp import lr_on_device

        return lr_on_device(learning_rate, total_steps, self.device)

    def training(self, train_step, model: nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: float):
        """(the step: (micro-batches, labelled_in_step=) -> StepResult; the module evaluation calls)."""
        on_gpu, compiled = self.device.type == "cuda", self.compile or self.graphs
        module = model
        if on_gpu:
            from mlm.speed import compiled as gpu

            module = gpu.AtPositions(module)
        if self.world_size > 1:
            module = nn.parallel.DistributedDataParallel(module, device_ids=[self.device] if on_gpu else None)
        if compiled:
            # Graphs: static shapes, one graph per shape, and few occur (full batches, an epoch's short last batch,
            # one or two padded label counts): letting dynamo switch to dynamic shapes costs far more.
            module = (torch.compile(module, mode="reduce-overhead", dynamic=False) if self.graphs
                      else torch.compile(module))
        step = partial(train_step, module, optimizer=optimizer, scaler=self.precision.scaler,
                       autocast_dtype=self.precision.autocast_dtype, max_grad_norm=max_grad_norm)
        # Evaluation through the compiled module runs at training speed; under DDP, whose forward would make the
        # processes wait for each other at every eval batch, on the plain model.
        eval_model = module if compiled and self.world_size == 1 else model
        if on_gpu:
            step = gpu.with_host_positions(step, graphs=self.graphs)
            eval_model = gpu.PositionsFromLabels(model, module, graphs=self.graphs) if eval_model is module else model
        return step, eval_model


def choose_path(config: TrainConfig, procs: Processes) -> ExecutionPath:
    """The execution path for `config` on this process's device; the CUDA graphs decision waits for `for_steps`."""
    device = procs.device
    lean = config.lean == "on" or (config.lean == "auto" and device.type == "cpu")
    if device.type == "cpu" and config.keep_freed_memory:
        from mlm.speed.host_memory import keep_freed_memory

        keep_freed_memory()  # no page faults per step (docs/performance.md, "CPU runs keep freed memory")
    why = "--lean auto: the default on a CPU" if config.lean == "auto" else "--lean on"
    says = (f"mlm/model.py with mlm/speed/lean.py's memory-saving modules ({why}; --lean off runs the plain one)"
            if lean else f"the plain model of mlm/model.py (--lean {config.lean}"
                         f"{' on a GPU' if config.lean == 'auto' else ''})")
    return ExecutionPath(device, procs.world_size, pick_precision(config.precision, device), lean,
                         config.fast_tokenize == "on", config.compile, config.cuda_graphs, config.grad_accum, says)


def graphs_choice(path: ExecutionPath, total_steps: int) -> tuple[bool, str]:
    """(record CUDA graphs?, how the steps run and why) for --cuda-graphs off | on | auto: on where they cannot run
    is an MLMError; auto records them on one GPU for runs of GRAPHS_MIN_STEPS steps or more."""
    plain = "torch.compile (--compile)" if path.compile else "eager"
    if path.graphs_asked == "off":
        return False, f"{plain} (--cuda-graphs off)"
    cannot = ("CUDA graphs need a CUDA GPU" if path.device.type != "cuda"
              else "CUDA graphs need one process (this run has several, under torchrun)" if path.world_size > 1
              else "CUDA graphs replay one forward and backward per step: `grad_accum` > 1" if path.grad_accum > 1
              else None)
    if path.graphs_asked == "on":
        if cannot:
            raise MLMError(f"`cuda_graphs` on: {cannot}. Use `cuda_graphs` off or auto.")
        return True, "CUDA graphs (--cuda-graphs on)"
    if cannot:
        return False, f"{plain}: {cannot} (--cuda-graphs auto)"
    if total_steps < GRAPHS_MIN_STEPS:
        return False, (f"{plain}: {total_steps} steps are too few to repay compiling CUDA graphs (--cuda-graphs auto "
                       f"records them from {GRAPHS_MIN_STEPS} steps; on forces them)")
    return True, f"CUDA graphs (--cuda-graphs auto: {total_steps} steps on one GPU; off runs eager)"
