"""The task loop, evaluation, checkpoints and results."""
