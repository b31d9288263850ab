"""Task streams: the shared data types every benchmark produces and the engine consumes.

A benchmark yields a :class:`TaskStream`: ``n_tasks`` :class:`Task` objects whose images are
uint8 tensors ``[N, C, H, W]`` (kept as uint8 on the training device; augmentation and
normalisation happen batched on the device, see :mod:`sparsecl.data.augment`). Labels are
*remapped* so that task ``t`` owns a contiguous label range ``task.classes`` (class order
position, not the dataset's raw label); this keeps Task-IL masking a slice.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sparsecl import SparseCLError

# The held-out examples do not depend on the run's seed: every run of a hyper-parameter search
# is scored on the same validation set.
VALIDATION_SEED = 0


@dataclass(frozen=True)
class AugmentSpec:
    """Batched training-time augmentation: random crop with zero padding, horizontal flip,
    then normalisation with per-channel ``mean``/``std`` (applied at evaluation too)."""

    crop_padding: int = 0
    hflip: bool = False
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclass
class Split:
    """One split (train or test) of one task."""

    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N], remapped global labels

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Task:
    index: int
    classes: list[int]  # remapped labels of this task, contiguous
    train: Split
    test: Split

    def to(self, device: torch.device | str) -> "Task":
        return Task(self.index, list(self.classes), self.train.to(device), self.test.to(device))


@dataclass
class TaskStream:
    """A continual benchmark, ready to train on."""

    name: str
    tasks: list[Task]
    input_shape: tuple[int, int, int]  # (C, H, W)
    n_classes: int
    augment: AugmentSpec
    default_backbone: str
    class_names: list[str]  # indexed by remapped label
    class_order: list[int]  # raw dataset label of each remapped label
    settings: frozenset[str] = field(default_factory=lambda: frozenset({"class-il", "task-il"}))

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def task_of_class(self) -> torch.Tensor:
        """int64 [n_classes]: the task index owning each remapped label."""
        out = torch.empty(self.n_classes, dtype=torch.long)
        for t in self.tasks:
            out[t.classes] = t.index
        return out

    def to(self, device: torch.device | str) -> "TaskStream":
        return TaskStream(
            self.name, [t.to(device) for t in self.tasks], self.input_shape, self.n_classes,
            self.augment, self.default_backbone, self.class_names, self.class_order, self.settings,
        )


def hold_out_validation(stream: TaskStream, fraction: float) -> TaskStream:
    """``stream`` with ``fraction`` of every class's training examples moved into the evaluation
    split, replacing the test set (for hyper-parameter selection without looking at test data).

    The count per class is exact (``round(fraction * n_class)``, at least one example) and the
    examples are drawn by a fixed generator (:data:`VALIDATION_SEED`), so every run, whatever its
    seed, trains and is scored on the same split. The remaining training examples keep their order."""
    if not 0.0 < fraction < 1.0:
        raise SparseCLError(f"validation must be a fraction in (0, 1), got {fraction}")
    rng = np.random.default_rng(VALIDATION_SEED)
    tasks = []
    for task in stream.tasks:
        train, val = split_held_out(task, fraction, rng, stream.class_names)
        tasks.append(Task(task.index, list(task.classes), train, val))
    return replace(stream, tasks=tasks)


def task_validation(task: Task, fraction: float, class_names: list[str]) -> tuple[Split, Split]:
    """``(train, validation)`` of one task: :func:`split_held_out` with a generator fixed by
    :data:`VALIDATION_SEED` and the task's index, for methods that hold out a validation split of
    each task themselves (CL-LSG's growth decision): every method and run draws the same split."""
    if not 0.0 < fraction < 1.0:
        raise SparseCLError(f"validation fraction must be in (0, 1), got {fraction}")
    return split_held_out(task, fraction, np.random.default_rng((VALIDATION_SEED, task.index)), class_names)


def split_held_out(task: Task, fraction: float, rng: np.random.Generator,
                   class_names: list[str]) -> tuple[Split, Split]:
    """``(kept, held)``: ``fraction`` of each class's training examples of ``task`` drawn by ``rng``
    (exact count ``round(fraction * n_class)``, at least one), the kept ones in their order."""
    y = task.train.y.cpu().numpy()
    held = np.zeros(y.shape[0], dtype=bool)
    for c in task.classes:  # stratified: every class keeps its share in both parts
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * idx.size)))
        if k >= idx.size:
            raise SparseCLError(f"validation={fraction} leaves no training example of class "
                                f"{class_names[c]!r} ({idx.size} examples)")
        held[rng.choice(idx, size=k, replace=False)] = True
    keep = torch.from_numpy(np.flatnonzero(~held)).to(task.train.y.device)
    val = torch.from_numpy(np.flatnonzero(held)).to(task.train.y.device)
    return Split(task.train.x[keep], task.train.y[keep]), Split(task.train.x[val], task.train.y[val])
