"""The run machinery behind the training loop (mlm/train.py), which calls into it; nothing here imports the loop."""
