"""Definitions that the model and the data side both need, in a module that imports nothing from mlm."""

# Label value of positions that carry no loss: PyTorch's cross_entropy default and the reference collator's.
IGNORE_INDEX = -100
