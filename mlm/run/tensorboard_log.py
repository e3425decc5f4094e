"""`--report-to tensorboard`: the figures of metrics.jsonl (SCALARS) as TensorBoard scalars in `tensorboard/` of the
output folder, at each record's optimizer step. torch.utils.tensorboard writes them but needs the `tensorboard`
package, an optional extra, which `require_tensorboard` checks for before a run does any work."""

from __future__ import annotations

from pathlib import Path

from mlm.errors import MLMError

LOG_DIR = "tensorboard"
# The figures of each kind of record that become curves, as "kind/name"; the rest (labels, prompts, times) are not.
SCALARS = {"train": ("loss", "lr", "grad_norm", "tokens_per_second"),
           "eval": ("perplexity", "reference_perplexity", "loss", "accuracy")}


def require_tensorboard():
    """torch's SummaryWriter class; MLMError, with the command that installs it, when `tensorboard` is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch.utils.tensorboard imports the tensorboard package at once
        raise MLMError(f"--report-to tensorboard needs the tensorboard package ({err}): pip install tensorboard "
                       "(the `tensorboard` extra of mlm's pyproject.toml), or leave --report-to out.") from None
    return SummaryWriter


class TensorBoardLog:
    def __init__(self, output_dir: str | Path):
        self.writer = require_tensorboard()(log_dir=str(Path(output_dir) / LOG_DIR))

    def write(self, kind: str, **values) -> None:
        if kind in SCALARS and "step" in values:
            for name in SCALARS[kind]:
                if isinstance(values.get(name), int | float):
                    self.writer.add_scalar(f"{kind}/{name}", values[name], global_step=values["step"])
            self.writer.flush()  # as metrics.jsonl: a crash or a live TensorBoard sees every record at once

    def close(self) -> None:
        self.writer.close()
