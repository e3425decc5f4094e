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
    """The lr of each step: mlm/optim.py's linear schedule over the steps that ran (a skipped step does not count).

    On the host (`on_device=False`, fp32 and bf16): the lr is the float the reference computes, and
    `progress.schedule_step` moves after each step. On the device (fp16): the count of steps that ran and the lr
    live in tensors, and the lr AdamW reads is a tensor the fused kernel takes, so no step waits for the host.
    `sync()` brings the count back into `progress.schedule_step` (a host read): before checkpoints only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, progress, base_lr: float, schedule, *, on_device: bool):
        """`progress`: the run's Progress (its schedule_step is kept here); `schedule`: warmup_steps, total_steps."""
        self.optimizer, self.progress, self.on_device = optimizer, progress, on_device
        self.base_lr, self.warmup_steps, self.total_steps = base_lr, schedule.warmup_steps, schedule.total_steps
        device = optimizer.param_groups[0]["params"][0].device
        if on_device:
            # float64 gives the host's values bit for bit: the same IEEE operations as linear_schedule's.
            self.step = torch.tensor(float(progress.schedule_step), dtype=torch.float64, device=device)
            self.lr_exact = torch.zeros((), dtype=torch.float64, device=device)
            # The fused CUDA kernel reads a float32 lr tensor (as it rounds a float lr); the CPU one takes any dtype.
            self.lr_tensor = self.lr_exact if device.type == "cpu" else torch.zeros((), device=device)
            for group in optimizer.param_groups:
                group["lr"] = self.lr_tensor

    def next(self) -> float | torch.Tensor:
        """Set the lr of the coming step and return it: a float, or on the device a () float64 tensor (read it
        only when logging)."""
        if not self.on_device:
            lr = self.base_lr * linear_schedule(self.progress.schedule_step, warmup_steps=self.warmup_steps,
                                                total_steps=self.total_steps)
            set_learning_rate(self.optimizer, lr)
            return lr
        warmup, total = self.warmup_steps, self.total_steps
        factor = torch.where(self.step < warmup, self.step / max(1, warmup),
                             ((total - self.step) / max(1, total - warmup)).clamp(min=0.0))
        torch.mul(factor, self.base_lr, out=self.lr_exact)
        if self.lr_tensor is not self.lr_exact:
            self.lr_tensor.copy_(self.lr_exact)
        return self.lr_exact

    def done(self, skipped: bool | torch.Tensor) -> None:
        """After a step: a skipped step (True, or 1.0 on the device) does not move the schedule."""
        if not self.on_device:
            self.progress.schedule_step += 0 if skipped else 1
        else:
            self.step.add_(1.0 - skipped.double())

    def sync(self) -> None:
        """Make progress.schedule_step exact (on the device: one host read)."""
        if self.on_device:
            self.progress.schedule_step = int(self.step.item())
