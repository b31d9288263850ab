"""Evaluation on every task's test set: Class-IL and Task-IL accuracy in one pass."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparsecl.data.augment import DeviceAugment
from sparsecl.data.stream import TaskStream
from sparsecl.metrics.predictions import correct_predictions

if TYPE_CHECKING:
    from sparsecl.engine.distributed import Distributed


@torch.no_grad()
def evaluate_all(method, stream: TaskStream, augment: DeviceAugment, after_task: int, batch_size: int,
                 dist: Distributed | None = None) -> tuple[list[float], list[float]]:
    """Accuracy (percent) on every task's test split after training task ``after_task``.

    Class-IL: argmax over the classes of tasks ``<= max(after_task, j)`` (the classes seen so far;
    for a future task j, the classes up to j, as Mammoth does when it measures forward transfer).
    Task-IL: argmax over task ``j``'s own classes (logits of other classes masked at evaluation only).
    Returns two lists of length ``n_tasks``.

    With ``dist`` each rank evaluates a contiguous shard of every test split and the correct
    counts are summed over ranks (one all-reduce), so every rank returns the full-test accuracies.
    """
    model = method.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    class_task = stream.task_of_class().to(device)
    with method.evaluation():
        counts = torch.stack([_correct_counts(method, task, augment, class_task, after_task, batch_size, dist)
                              for task in stream.tasks])
    model.train(was_training)
    if dist is not None:
        dist.all_reduce_sum_(counts)
    cil, til = [], []
    for task, (correct_c, correct_t) in zip(stream.tasks, counts.tolist()):  # one host sync
        n = max(len(task.test), 1)
        cil.append(100.0 * correct_c / n)
        til.append(100.0 * correct_t / n)
    return cil, til


def _correct_counts(method, task, augment: DeviceAugment, class_task: torch.Tensor, after_task: int,
                    batch_size: int, dist: Distributed | None) -> torch.Tensor:
    """int64 ``[2]``: Class-IL and Task-IL correct predictions on one task's test split (this
    rank's shard of it under ``dist``)."""
    j = task.index
    visible = torch.nonzero(class_task <= max(after_task, j)).flatten()
    own = torch.nonzero(class_task == j).flatten()
    x_all, y_all = task.test.x, task.test.y
    if dist is not None:
        n = len(task.test)
        lo, hi = n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size
        x_all, y_all = x_all[lo:hi], y_all[lo:hi]
    return correct_predictions(lambda x: method.eval_logits(x, j), x_all, y_all, [visible, own], batch_size,
                               augment.eval)
