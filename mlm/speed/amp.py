"""fp16 without a host read per step: the GradScaler's verdict and the learning-rate schedule stay on the device.

A step whose fp16 gradients overflow is skipped, and a skipped step does not advance the schedule (the reference
Trainer steps its LambdaLR only after a step that ran). Learning whether a step was skipped used to mean reading
the loss scale back after every step, which stalls the GPU until the step ends and rules out queueing the next
one. Here the fused AdamW receives the scaler's `found_inf` (a device tensor) and undoes a skipped step itself,
and `LearningRate` counts the steps that ran on the device and computes the next lr there, so the host reads the
count only when a log line or a checkpoint needs it.

fp32 and bf16 have no scaler and nothing to skip: their lr is computed on the host, a Python float, as before.
"""

from __future__ import annotations

import torch

from mlm.optim import linear_schedule, set_learning_rate


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """scaler.step(optimizer) and scaler.update(); returns found_inf, () float32 on the device: 1.0 where the step
    was skipped for inf/nan gradients. No host read with an optimizer that takes the scaler's verdict itself
    (`_step_supports_amp_scaling`: the fused AdamW of mlm/optim.py)."""
    seen = {}

    def keep_found_inf(opt, args, kwargs):
        # GradScaler hands such an optimizer `found_inf` as an attribute for the length of its step() call.
        seen["found_inf"] = getattr(opt, "found_inf", None)

    handle = optimizer.register_step_pre_hook(keep_found_inf)
    try:
        scaler.step(optimizer)
    finally:
        handle.remove()
    scaler.update()
    device = optimizer.param_groups[0]["params"][0].device
    if "found_inf" not in seen:  # another optimizer: the scaler read found_inf on the host and skipped step()
        return torch.ones((), device=device)
    if seen["found_inf"] is None:  # it ran step() after its own host check: not skipped
        return torch.zeros((), device=device)
    return (seen["found_inf"] > 0).float()


class LearningRate:
    """The lr of each step (mlm/optim.py's linear schedule over the steps that ran), and the count of skipped steps.

    On the host (`on_device=False`): the lr is the float the reference computes, and `progress.schedule_step`
    moves after each step. On the device (fp16): the count of steps that ran and the lr live in tensors; the lr
    given to AdamW is a tensor the fused kernel reads, so no step waits for the host. `read()` brings the count
    back (a host read): call it for log lines and before checkpoints only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, progress, base_lr: float, schedule, *, on_device: bool):
        """`progress`: the run's Progress (its schedule_step is kept here); `schedule`: warmup_steps, total_steps."""
        self.optimizer, self.progress, self.on_device = optimizer, progress, on_device
        self.base_lr, self.warmup_steps, self.total_steps = base_lr, schedule.warmup_steps, schedule.total_steps
        device = optimizer.param_groups[0]["params"][0].device
        self.lr = 0.0  # the lr of the last step, as a host float (on the device: as of the last read)
        self.skipped = self.skipped_logged = 0
        if on_device:
            # float64 gives the host's values bit for bit: the same IEEE operations as linear_schedule's.
            self.step = torch.tensor(float(progress.schedule_step), dtype=torch.float64, device=device)
            self.lr_exact = torch.zeros((), dtype=torch.float64, device=device)
            self.skipped_count = torch.zeros((), dtype=torch.float64, device=device)
            # The fused CUDA kernel reads a float32 lr tensor (as it rounds a float lr); the CPU one takes any dtype.
            self.lr_tensor = self.lr_exact if device.type == "cpu" else torch.zeros((), device=device)
            for group in optimizer.param_groups:
                group["lr"] = self.lr_tensor

    def set(self) -> None:
        """Before a step: its lr, from the steps that ran so far."""
        if not self.on_device:
            self.lr = self.base_lr * linear_schedule(self.progress.schedule_step, warmup_steps=self.warmup_steps,
                                                     total_steps=self.total_steps)
            set_learning_rate(self.optimizer, self.lr)
            return
        warmup, total = self.warmup_steps, self.total_steps
        factor = torch.where(self.step < warmup, self.step / max(1, warmup),
                             ((total - self.step) / max(1, total - warmup)).clamp(min=0.0))
        torch.mul(factor, self.base_lr, out=self.lr_exact)
        if self.lr_tensor is not self.lr_exact:
            self.lr_tensor.copy_(self.lr_exact)

    def count(self, skipped: bool | torch.Tensor) -> None:
        """After a step: a skipped step (True, or 1.0 on the device) does not move the schedule."""
        if not self.on_device:
            self.progress.schedule_step += 0 if skipped else 1
            self.skipped += int(bool(skipped))
            return
        self.step.add_(1.0 - skipped.double())
        self.skipped_count.add_(skipped.double())

    def read(self) -> None:
        """progress.schedule_step, self.lr and self.skipped made exact: on the device, one host read."""
        if self.on_device:
            step, lr, skipped = torch.stack([self.step, self.lr_exact, self.skipped_count]).tolist()
            self.progress.schedule_step, self.lr, self.skipped = int(step), lr, int(skipped)

    def for_log(self, due: bool = True) -> tuple[float, int]:
        """(the last step's lr, the steps skipped since the last log line). run.log_step writes them only at its
        log steps: on the device they are read (a host read) only when `due`, and are placeholders otherwise."""
        if not due:
            return self.lr, 0
        self.read()
        skipped, self.skipped_logged = self.skipped - self.skipped_logged, self.skipped
        return self.lr, skipped
