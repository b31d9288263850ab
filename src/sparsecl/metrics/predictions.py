"""Counting a model's correct predictions on a split: the one loop shared by the engine's
evaluation (Class-IL and Task-IL after every task) and the methods' own accuracy checks (EsaCL's
prune report, CL-LSG's and Scratch's targets, PackNet-style validation)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


@torch.no_grad()
def correct_predictions(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        class_sets: Sequence[torch.Tensor], batch_size: int,
                        transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """int64 ``[len(class_sets)]``: for each set of class indices, how many examples of ``(x, y)``
    the argmax of the logits gets right with every other class's logit at -inf (all seen classes:
    Class-IL; one task's: Task-IL). ``transform`` prepares each batch of inputs (e.g. the
    evaluation augmentation); the counts stay on the device (no host sync)."""
    counts = torch.zeros(len(class_sets), dtype=torch.long, device=y.device)
    hidden: list[torch.Tensor] = []  # per set, the classes outside it (built once the width is known)
    for start in range(0, int(y.shape[0]), batch_size):
        xb = x[start:start + batch_size]
        logits = logits_fn(transform(xb) if transform is not None else xb).float()
        if not hidden:
            for classes in class_sets:
                outside = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
                outside[classes] = False
                hidden.append(outside)
        yb = y[start:start + batch_size]
        for i, outside in enumerate(hidden):
            counts[i] += (logits.masked_fill(outside, float("-inf")).argmax(1) == yb).sum()
    return counts


def percent(correct: torch.Tensor, n: int) -> list[float]:
    """Counts of :func:`correct_predictions` as percentages of ``n`` examples (one host sync)."""
    return [100.0 * c / max(n, 1) for c in correct.tolist()]
