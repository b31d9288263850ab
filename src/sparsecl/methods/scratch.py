"""Scratch (``scratch``): one separate full model per task, trained from scratch (CL-LSG's baseline).

Every task starts from the same initial weights (the model as built from the run's seed), trains
the whole backbone and its own head on the task's data only, and keeps a private copy of the
backbone: no forgetting and no transfer, and the model size grows by one full network per task
(reported as ``size_task`` = 1.0 and ``size_total`` = tasks so far, in units of the full network,
as CL-LSG's Tables 2-3). Task-IL only (per-task heads).

Like CL-LSG (and Grow), it trains on each task's training data less the validation split that
CL-LSG holds out for its growth decision (``val_fraction``, :class:`TaskValidation`; the paper
splits each CIFAR-100 task 4000/1000/1000 train/validation/test), so that the three train on the
same examples.

:func:`scratch_accuracy` trains such a model for one task outside the engine; CL-LSG uses it for
its target accuracy (``target: scratch``), measured on the task's validation split.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsecl import SparseCLError
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.stream import Split, Task, task_validation
from sparsecl.methods.base import TASK_IL, ContinualMethod, MethodOptions, TaskSubnetworks, register_method
from sparsecl.metrics.predictions import correct_predictions, percent


@torch.no_grad()
def task_il_accuracy(model_fn: Callable[[torch.Tensor], torch.Tensor], split: Split, classes: torch.Tensor,
                     augment: DeviceAugment, batch_size: int = 256) -> float:
    """Task-IL accuracy (percent) of ``model_fn`` on ``split``: argmax over the task's ``classes`` only."""
    return percent(correct_predictions(model_fn, split.x, split.y, [classes], batch_size, augment.eval),
                   len(split))[0]


def scratch_accuracy(template: nn.Module, train: Split, evaluate: Split, classes: list[int],
                     augment: DeviceAugment, *, epochs: int, lr: float, batch_size: int,
                     generator: torch.Generator, count_samples: Callable[[int, int], None] | None = None) -> float:
    """Train a copy of ``template`` (the untrained full model) with SGD on ``train`` (one task's
    data, labels in ``classes``) and return its Task-IL accuracy on ``evaluate``: CL-LSG's target
    accuracy (``evaluate`` = the task's validation split)."""
    model = copy.deepcopy(template)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    classes_t = torch.as_tensor(classes, device=train.y.device)
    keep = torch.zeros(model.n_classes, dtype=torch.bool, device=classes_t.device)
    keep[classes_t] = True
    n = len(train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator, device="cpu").to(train.y.device)
        for b in range(math.ceil(n / batch_size)):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            logits = model(augment.train(train.x[idx])).masked_fill(~keep, float("-inf"))
            loss = F.cross_entropy(logits, train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if count_samples is not None:
            count_samples(n, 0)
    model.eval()
    return task_il_accuracy(model, evaluate, classes_t, augment)


def task_target(target: str | float | list[float], cache: list[float], task: Task, train: Split, val: Split,
                template: nn.Module, augment: DeviceAugment, *, epochs: int, lr: float, batch_size: int,
                generator: torch.Generator, count_samples: Callable[[int, int], None] | None = None) -> float:
    """The target accuracy of ``task`` (CL-LSG's and CPG's growth criterion): a fixed number, one
    per task from a list, or (``'scratch'``) :func:`scratch_accuracy` of ``template`` trained on
    ``train`` and scored on ``val``, computed once per task and appended to ``cache`` (which the
    caller keeps in its checkpointed state)."""
    if isinstance(target, float):
        return target
    if isinstance(target, list):
        return target[task.index]
    if len(cache) <= task.index:
        cache.append(scratch_accuracy(template, train, val, task.classes, augment, epochs=epochs, lr=lr,
                                      batch_size=batch_size, generator=generator, count_samples=count_samples))
    return cache[task.index]


@dataclass
class ScratchOptions(MethodOptions):
    val_fraction: float = 0.2  # of each task's training data held out (CL-LSG's decision split)

    def validate(self) -> None:
        super().validate()
        if not 0 < self.val_fraction < 1:
            raise SparseCLError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


class TaskValidation:
    """Mixin: hold out ``opt.val_fraction`` of each task's training examples (stratified, the same
    examples in every method and run: :func:`~sparsecl.data.stream.task_validation`); the engine
    trains on the rest (:meth:`train_split`), :meth:`held_out` gives both parts."""

    _held: tuple[int, Split, Split] | None = None

    def held_out(self, task: Task) -> tuple[Split, Split]:
        """``(train, validation)`` of ``task`` (the current task's are cached)."""
        if self._held is None or self._held[0] != task.index:
            train, val = task_validation(task, self.options.val_fraction, self.ctx.stream.class_names)
            self._held = (task.index, train, val)
        return self._held[1], self._held[2]

    def train_split(self, task: Task) -> Split:
        return self.held_out(task)[0]


@register_method
class Scratch(TaskValidation, TaskSubnetworks, ContinualMethod):
    """A separate model per task, each trained from the same initial weights (Task-IL only)."""

    name = "scratch"
    description = "Scratch: one separate full model per task (CL-LSG baseline, model size T x)"
    options_cls = ScratchOptions
    settings = frozenset({TASK_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self.split_task_heads(model)
        self.backbone_names = [f"backbone.{n}" for n in model.backbone.state_dict()]
        self.init_state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
        self.models: list[dict[str, torch.Tensor]] = []  # backbone state of each finished task
        self.val_accuracy: list[float] = []  # Task-IL accuracy of each task's model on its validation split
        self._saved: dict[str, torch.Tensor] | None = None
        self._view: int | None = None

    def begin_task(self, task: Task) -> None:
        self.model.backbone.load_state_dict(self.init_state)  # a fresh model for every task
        self.train_backbone(task)

    def train_backbone(self, task: Task) -> None:
        """Start ``task`` on the live backbone: an optimiser over it and the task's own head."""
        self.task = task.index
        params = list(self.model.backbone.parameters()) + list(self.model.head.heads[task.index].parameters())
        self.optimizer = self.make_optimizer(params)

    def end_task(self, task: Task) -> None:
        self.models.append({k: v.detach().clone() for k, v in self.model.backbone.state_dict().items()})
        was = self.model.training
        self.model.eval()
        classes = torch.as_tensor(task.classes, device=self.device)
        self.val_accuracy.append(task_il_accuracy(self.model, self.held_out(task)[1], classes, self.ctx.augment))
        self.model.train(was)

    def _view_tensors(self) -> dict[str, torch.Tensor]:
        return self.model.backbone.state_dict(keep_vars=True)

    def _use_task(self, j: int) -> None:
        """Task j's own backbone (a task not trained yet: the live one)."""
        self.model.backbone.load_state_dict(self.models[j] if j < len(self.models) else self._saved)
        self._view = j

    def report(self) -> dict:
        t = len(self.models)
        return {"size_task": [1.0] * t, "size_total": [float(i + 1) for i in range(t)],
                "model_size": float(t), "size_unit": "full backbone (conv/linear weights)",
                "val_accuracy": [round(a, 6) for a in self.val_accuracy]}

    def state_dict(self) -> dict:
        return {"models": self.models, "val_accuracy": torch.tensor(self.val_accuracy, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.models = [{k: v.to(self.device) for k, v in m.items()} for m in state["models"]]
        self.val_accuracy = [float(v) for v in state["val_accuracy"]]
