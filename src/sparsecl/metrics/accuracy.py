"""Continual-learning metrics computed from a measured accuracy matrix (SPEC, Metrics).

``R[i][j]`` is the accuracy (percent) on task ``j`` after training task ``i``; the engine measures
every entry for real after every task, future tasks included (needed by FWT). ``b[j]`` is the
accuracy of the randomly initialised model (the run's own model before any training) on task ``j``.

Definitions (0-based, ``T`` tasks, last row ``T-1``):

- ACC = mean_j R[T-1][j]
- BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])
- FWT = mean_{j >= 1} (R[j-1][j] - b[j])   (Lopez-Paz & Ranzato, 2017)
- forgetting = mean_{j < T-1} (max_{j <= i < T-1} R[i][j] - R[T-1][j])   (Chaudhry et al., 2018):
  the best accuracy the task ever had after being learned and before the end, minus its final one.

With a single task, BWT, FWT and forgetting are undefined and reported as ``None``.
"""
from __future__ import annotations

from typing import Sequence

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> int:
    T = len(R)
    if T == 0 or any(len(row) < T for row in R):
        raise ValueError("accuracy matrix must be square (T x T) with T >= 1")
    return T


def average_accuracy(R: Matrix) -> float:
    """Mean accuracy over all tasks after the last task."""
    T = _check(R)
    return sum(R[T - 1][:T]) / T


def backward_transfer(R: Matrix) -> float | None:
    """Mean change of each earlier task's accuracy between learning it and the end (negative = forgetting)."""
    T = _check(R)
    if T < 2:
        return None
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(R: Matrix, random_init: Sequence[float]) -> float | None:
    """Mean accuracy on task j before training it, above the random-init model's (Lopez-Paz)."""
    T = _check(R)
    if T < 2:
        return None
    if len(random_init) < T:
        raise ValueError("random_init needs one accuracy per task")
    return sum(R[j - 1][j] - random_init[j] for j in range(1, T)) / (T - 1)


def forgetting(R: Matrix) -> float | None:
    """Mean drop from each earlier task's best accuracy (after learning it) to its final accuracy."""
    T = _check(R)
    if T < 2:
        return None
    total = 0.0
    for j in range(T - 1):
        best = max(R[i][j] for i in range(j, T - 1))
        total += best - R[T - 1][j]
    return total / (T - 1)


def summarize(R: Matrix, random_init: Sequence[float] | None = None) -> dict[str, float | None]:
    """All scalar metrics of one accuracy matrix (``fwt`` is None without ``random_init``)."""
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, random_init) if random_init is not None else None,
        "forgetting": forgetting(R),
    }
