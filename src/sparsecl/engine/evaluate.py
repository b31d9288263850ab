"""Evaluation on every task's test set: Class-IL and Task-IL accuracy in one pass."""
from __future__ import annotations

import torch

from sparsecl.data.augment import DeviceAugment
from sparsecl.data.stream import TaskStream


@torch.no_grad()
def evaluate_all(method, stream: TaskStream, augment: DeviceAugment, after_task: int, batch_size: int) -> tuple[list[float], list[float]]:
    """Accuracy (percent) on every task's test split after training task ``after_task``.

    Class-IL: argmax over the classes of tasks ``<= max(after_task, j)`` (the classes seen so far;
    for a future task j, the classes up to j, as Mammoth does when it measures forward transfer).
    Task-IL: argmax over task ``j``'s own classes (logits of other classes masked at evaluation only).
    Returns two lists of length ``n_tasks``.
    """
    model = method.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    class_task = stream.task_of_class().to(device)
    cil, til = [], []
    with method.evaluation():
        for task in stream.tasks:
            cil_j, til_j = _evaluate_task(method, task, augment, class_task, after_task, batch_size)
            cil.append(cil_j)
            til.append(til_j)
    model.train(was_training)
    return cil, til


def _evaluate_task(method, task, augment: DeviceAugment, class_task: torch.Tensor, after_task: int,
                   batch_size: int) -> tuple[float, float]:
    """Class-IL and Task-IL accuracy (percent) on one task's test split."""
    device = class_task.device
    j = task.index
    visible = class_task <= max(after_task, j)
    own = class_task == j
    correct_c = torch.zeros((), dtype=torch.long, device=device)
    correct_t = torch.zeros((), dtype=torch.long, device=device)
    x_all, y_all = task.test.x, task.test.y
    for start in range(0, len(task.test), batch_size):
        x = augment.eval(x_all[start : start + batch_size])
        y = y_all[start : start + batch_size]
        logits = method.eval_logits(x, j).float()
        correct_c += (logits.masked_fill(~visible, float("-inf")).argmax(1) == y).sum()
        correct_t += (logits.masked_fill(~own, float("-inf")).argmax(1) == y).sum()
    n = max(len(task.test), 1)
    return 100.0 * correct_c.item() / n, 100.0 * correct_t.item() / n
