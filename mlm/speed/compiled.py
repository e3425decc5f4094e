"""The step on a GPU, which never waits for it: label positions found on the host, and CUDA graphs' fixed shapes.

`model.forward` finds the labelled positions with `nonzero` on the device, which makes the host wait until the GPU
has caught up, at every step. On a GPU the training step therefore calls `AtPositions`, the model's own `loss_at`
given positions that `with_host_positions` finds on the host, where the labels are made, before the batch is moved.

CUDA graphs (--cuda-graphs) record one graph per tensor shape, so the positions are padded to a multiple of
CUDA_GRAPH_PADDING with an unlabelled position (its label -100 adds no loss and no gradient): a few lengths occur in
a run instead of one per step. Neither changes a value; tests/test_model.py and the CUDA tests check both.
"""

from __future__ import annotations

import torch
from torch import nn

CUDA_GRAPH_PADDING = 256


class AtPositions(nn.Module):
    """The model called with its labelled positions given: `loss_at` (mlm/model.py)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, positions, attention_mask=None):
        return self.model.loss_at(positions, input_ids, attention_mask, labels)


def label_positions(labels: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """The flat indices of the labelled entries of `labels` (B, L), padded to a multiple of `multiple` by repeating
    the first unlabelled index (label -100: no loss): (N [+ padding],) int64, on the labels' device."""
    labelled = labels.reshape(-1) != -100
    positions = labelled.nonzero().squeeze(1)  # (N,)
    missing = -len(positions) % multiple
    unlabelled = (~labelled).nonzero()
    if missing == 0 or len(unlabelled) == 0:
        return positions
    return torch.cat([positions, unlabelled[0].expand(missing)])


def with_host_positions(step, *, graphs: bool):
    """`step` (train_step on an AtPositions module) given each micro-batch's positions, found on the host; under CUDA
    graphs padded, and the previous step's graph outputs released before the step."""
    multiple = CUDA_GRAPH_PADDING if graphs else 1

    def step_with_positions(micro_batches, **kwargs):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return step([{**batch, "positions": label_positions(batch["labels"], multiple)} for batch in micro_batches],
                    **kwargs)

    return step_with_positions


class PositionsFromLabels(nn.Module):
    """Evaluation through the training step's compiled AtPositions module, with the model's forward signature: the
    positions are found from the labels on the device (evaluation may wait for the GPU), padded as in training."""

    def __init__(self, model: nn.Module, compiled: nn.Module, *, graphs: bool):
        super().__init__()
        self.model, self.multiple, self.graphs = model, CUDA_GRAPH_PADDING if graphs else 1, graphs
        self._compiled = [compiled]  # not a submodule: `model` holds the parameters

    def forward(self, input_ids, attention_mask=None, labels=None):
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous batch's outputs have been read: reuse them
        return self._compiled[0](input_ids=input_ids, labels=labels, positions=label_positions(labels, self.multiple),
                                 attention_mask=attention_mask)
