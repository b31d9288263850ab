"""Classifier heads and the :class:`ContinualNet` wrapper (backbone + head, global label space)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sparsecl import SparseCLError


class MultiHead(nn.Module):
    """One linear classifier per task, written into the global label positions of its classes.

    ``forward`` always returns ``[B, n_classes]`` so downstream code needs no task bookkeeping:
    the logits of task ``t``'s head land at ``task_classes[t]`` (any order, not necessarily
    contiguous). Positions that belong to no task are 0. The heads are separate ``nn.Linear``
    modules (``heads.<t>.weight``), so a loss on one task's logits gives no gradient to another's.
    """

    def __init__(self, in_features: int, n_classes: int, task_classes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        classes = [[int(c) for c in task] for task in task_classes]
        flat = [c for task in classes for c in task]
        if not classes or any(len(task) == 0 for task in classes):
            raise SparseCLError("multi-head model needs at least one task and at least one class per task")
        if any(c < 0 or c >= n_classes for c in flat):
            raise SparseCLError(f"task classes must lie in [0, {n_classes}), got {sorted(set(flat))}")
        if len(set(flat)) != len(flat):
            raise SparseCLError("task classes overlap: each class must belong to exactly one task")
        self.in_features = int(in_features)
        self.n_classes = int(n_classes)
        self.task_classes = classes
        self.heads = nn.ModuleList(nn.Linear(in_features, len(task)) for task in classes)
        # Device-side index so the scatter needs no host sync (CUDA-graph friendly); not saved.
        self.register_buffer("index", torch.tensor(flat, dtype=torch.long), persistent=False)

    @property
    def n_tasks(self) -> int:
        """Number of task heads."""
        return len(self.heads)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outs = torch.cat([head(features) for head in self.heads], dim=1)
        logits = outs.new_zeros(features.shape[0], self.n_classes)
        return logits.index_copy(1, self.index, outs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, n_classes={self.n_classes}, n_tasks={self.n_tasks}"


class ContinualNet(nn.Module):
    """A backbone (feature extractor) and a head over the global label space.

    Attributes:
        backbone: the feature extractor (``backbone(x) -> [B, feature_dim]``).
        head: ``nn.Linear(feature_dim, n_classes)`` (single head) or a :class:`MultiHead`.
        feature_dim: width of the feature vector.
        n_classes: size of the global label space; ``forward`` returns ``[B, n_classes]``.
        task_classes: the classes of each task for a multi-head model, else ``None``.
        allocation: the designed output width of each backbone layer (layer name -> channels) when
            reserve channels were added past it (:func:`sparsecl.sparse.capacity.widen_`), else empty.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        n_classes: int,
        *,
        task_classes: list[list[int]] | None = None,
        backbone_name: str = "",
        input_shape: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = int(backbone.feature_dim)
        self.n_classes = int(n_classes)
        self.task_classes = task_classes
        self.backbone_name = backbone_name
        self.input_shape = tuple(input_shape)
        self.allocation: dict[str, int] = {}

    @property
    def multi_head(self) -> bool:
        """True when the head is a :class:`MultiHead` (one classifier per task)."""
        return isinstance(self.head, MultiHead)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[B, feature_dim]``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, n_classes]`` in the global label space."""
        return self.head(self.backbone(x))


def nearest_mean_logits(features: torch.Tensor, class_means: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Nearest-mean-of-exemplars scores (iCaRL): minus the Euclidean distance of the L2-normalised
    ``features`` to each class mean, ``-inf`` for classes without a mean (``seen`` false)."""
    f = torch.nn.functional.normalize(features.float(), dim=1)
    return (-torch.cdist(f, class_means)).masked_fill(~seen, float("-inf"))


class NearestMeanClassifier(nn.Module):
    """A trained :class:`ContinualNet` classified by nearest mean of exemplars, as iCaRL
    evaluates it: ``forward`` gives :func:`nearest_mean_logits` of ``model.features(x)`` (the
    exported form of an iCaRL run; the linear head inside ``model`` is not used)."""

    def __init__(self, model: nn.Module, class_means: torch.Tensor, seen: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("class_means", class_means.float())
        self.register_buffer("seen", seen.bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nearest_mean_logits(self.model.features(x), self.class_means, self.seen)
