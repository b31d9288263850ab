"""Extra training passes a method runs itself, beyond the engine's epochs of a task (NISPA's later
phases, DEN's selective/expansion/split stages, CPG's growing, pruning and retraining).

:func:`run_epochs` goes through :meth:`ContinualMethod.observe` with augmented batches, as the
engine does, so every pass is charged to the run's FLOP counter by the engine's forward hook.
"""
from __future__ import annotations

import torch

from sparsecl.data.stream import Split
from sparsecl.methods.base import Batch, ContinualMethod
from sparsecl.methods.scratch import task_il_accuracy


def run_epochs(method: ContinualMethod, split: Split, task_id: int, epochs: int) -> torch.Tensor:
    """Train ``method`` on ``split`` for ``epochs`` shuffled epochs; returns the mean loss of the
    last epoch (a device tensor; zero for ``epochs == 0``)."""
    bs, aug = method.ctx.batch_size, method.ctx.augment
    total = torch.zeros((), device=method.device)
    for _ in range(epochs):
        total = torch.zeros((), device=method.device)
        perm = torch.randperm(len(split), device=method.device)
        for start in range(0, len(split), bs):
            idx = perm[start:start + bs]
            x_raw, y = split.x[idx], split.y[idx]
            total += method.observe(Batch(aug.train(x_raw), y, x_raw, idx, task_id)) * len(idx)
    return total / max(len(split), 1)


def split_accuracy(method: ContinualMethod, split: Split, classes: torch.Tensor) -> float:
    """Accuracy (percent) of ``method.model`` on ``split``, argmax over ``classes`` only (Task-IL: the
    task's classes; Class-IL: the classes seen so far), in eval mode (the mode is restored)."""
    was = method.model.training
    method.model.eval()
    acc = task_il_accuracy(method.model, split, classes, method.ctx.augment)
    method.model.train(was)
    return acc
