"""Training: runner, data, checkpoints, packing, launch, CLI verbs train and demo."""
