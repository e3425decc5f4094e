"""`--report-to tensorboard`: the figures of metrics.jsonl as TensorBoard scalars, for curves to look at.

torch.utils.tensorboard writes the event files but needs the `tensorboard` package, an optional extra
(`pip install "mlm[tensorboard]"`): `require_tensorboard` checks for it before a run does any work, and
`TensorBoardLog` receives every record runtime.MetricsLog writes.

    train  train/loss, train/lr, train/grad_norm, train/tokens_per_second   at the optimizer step
    eval   eval/perplexity, eval/reference_perplexity, eval/loss, eval/accuracy   at the step it was measured
"""

from __future__ import annotations

from pathlib import Path

from mlm.errors import MLMError

LOG_DIR = "tensorboard"  # in the output folder, beside metrics.jsonl

# The figures of each kind of record that become curves; the rest (labels, prompts, times) are not numbers to plot.
SCALARS = {
    "train": ("loss", "lr", "grad_norm", "tokens_per_second"),
    "eval": ("perplexity", "reference_perplexity", "loss", "accuracy"),
}


def require_tensorboard():
    """torch's SummaryWriter class; MLMError, with the command that installs it, when `tensorboard` is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch.utils.tensorboard imports the tensorboard package at once
        raise MLMError(f"--report-to tensorboard needs the tensorboard package ({err}): pip install tensorboard "
                       "(or pip install 'mlm[tensorboard]'), or leave --report-to out.") from None
    return SummaryWriter


class TensorBoardLog:
    """Writes the train and eval records of a run as scalars to `output_dir`/tensorboard."""

    def __init__(self, output_dir: str | Path):
        self.log_dir = Path(output_dir) / LOG_DIR
        self.writer = require_tensorboard()(log_dir=str(self.log_dir))

    def write(self, kind: str, **values) -> None:
        names = SCALARS.get(kind)
        if names is None or "step" not in values:
            return
        for name in names:
            if isinstance(values.get(name), int | float):
                self.writer.add_scalar(f"{kind}/{name}", values[name], global_step=values["step"])
        self.writer.flush()  # as metrics.jsonl: a crash or a live TensorBoard sees every record at once

    def close(self) -> None:
        self.writer.close()
