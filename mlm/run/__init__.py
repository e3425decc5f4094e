"""The run machinery behind the training loop: the run record, the output folder and its lock, training
checkpoints, processes, precision and signals, the metrics log, the model card, the Hub push, TensorBoard.

The loop (mlm/train.py) calls into this package; nothing here imports the loop.
"""
