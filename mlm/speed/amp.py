"""fp16 without a host read per step: the learning-rate schedule looked up on the device.

Under fp16 a step whose gradients overflow is skipped, and a skipped step does not advance the schedule (the
reference Trainer steps its LambdaLR only after a step that ran). `train_step` tells whether a step ran by a device
tensor (`StepResult.ran`, from the loss scale, without reading it back), and the loop adds it to
`progress.schedule_step`, which from then on is a device tensor too. To set the next step's lr without reading that
count back, `lr_on_device` computes the schedule's lr at every count the run can reach, once, with the schedule
function itself, and looks the count up in that table on the device. The host reads the count only when a log
line or a checkpoint needs it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def lr_on_device(learning_rate: Callable[[int], float], total_steps: int,
                 device: torch.device) -> Callable[[int | torch.Tensor], torch.Tensor]:
    """`learning_rate` (step -> float) as a lookup: step (an int, or a () int64 tensor on `device`) -> () tensor on
    `device` holding learning_rate(step), bit for bit."""
    values = [learning_rate(step) for step in range(total_steps + 1)]
    # The fused CUDA AdamW reads a float32 lr tensor, as it rounds a float lr; the CPU one reads any dtype.
    table = torch.tensor(values, dtype=torch.float32 if device.type == "cuda" else torch.float64, device=device)

    def lookup(step: int | torch.Tensor) -> torch.Tensor:
        return table[step] if isinstance(step, int) else table.index_select(0, step.reshape(1)).squeeze(0)

    return lookup
