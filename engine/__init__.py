"""Engine: the training step and loop, evaluation and metrics, checkpoints, distributed helpers."""
