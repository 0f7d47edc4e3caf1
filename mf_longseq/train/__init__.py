"""Training: the Trainer and its step executors, data, optimizer, checkpoints, packing, MindFormers adapters."""
