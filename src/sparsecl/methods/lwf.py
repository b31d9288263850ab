"""Learning without Forgetting (``lwf``), Mammoth's class-incremental variant.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2018. No stored data: at the end of each
task the model is frozen into a copy (the old model); while learning the next task, its outputs on
the *current* inputs for the old classes are the soft targets of a distillation term.

Loss at task ``t > 0``::

    CE(logits restricted to the classes seen so far, y)
      + alpha * KL( softmax(old[:, old classes] / T) || softmax(new[:, old classes] / T) )

As in Mammoth's ``lwf`` (Buzzega et al. 2020): the cross-entropy is restricted to the classes of
tasks ``<= t``; one softmax runs over all old classes; no ``T^2`` factor; before each new task the
new classes' rows of the classifier are warmed up on the frozen features (Li & Hoiem's warm-up step;
``warmup_epochs``, default the run's epochs as Mammoth, 0 disables). Differences, on purpose: the KL
divergence replaces Mammoth's cross-entropy to the soft targets (they differ by the targets' entropy,
a constant, so the gradients are the same and the term is 0 when the model equals its old copy); the
old model sees the same (augmented) inputs as the new one, where Mammoth precomputes it on the
non-augmented images. In the Task-IL setting the CE is the engine's per-task CE and the distillation
is summed over the old tasks, one softmax per old task's classes (the paper's multi-head form).

Warm-up passes are counted as forward-only samples (the features are computed without gradients;
the classifier's own backward is a negligible fraction of the model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, Batch, ContinualMethod, MethodOptions, StepLoss, StepOutputs, register_method
from sparsecl.methods.teacher import FrozenCopy


@dataclass
class LwFOptions(MethodOptions):
    lr: float = 0.01
    weight_decay: float = 5e-4
    alpha: float = 3.0  # weight of the distillation term
    temperature: float = 2.0  # softmax temperature T of the distillation
    warmup_epochs: int | None = None  # epochs training only the new classes' head; None = the run's epochs
    warmup_lr: float | None = None  # None = lr

    def validate(self) -> None:
        super().validate()
        if self.alpha < 0:
            raise SparseCLError(f"alpha must be >= 0, got {self.alpha}")
        if not self.temperature > 0:
            raise SparseCLError(f"temperature must be > 0, got {self.temperature}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise SparseCLError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.warmup_lr is not None and not self.warmup_lr > 0:
            raise SparseCLError(f"warmup_lr must be > 0, got {self.warmup_lr}")


def distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of KL(softmax(old / T) || softmax(new / T)); 0 when the logits agree."""
    log_p_new = F.log_softmax(new_logits.float() / temperature, dim=1)
    log_p_old = F.log_softmax(old_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_new, log_p_old, log_target=True, reduction="batchmean")


@register_method
class LwF(ContinualMethod):
    """Cross-entropy on the current task plus distillation of the old model's old-class outputs."""

    name = "lwf"
    description = "LwF (Li & Hoiem): distillation (alpha, temperature) from a frozen copy of the previous model"
    options_cls = LwFOptions

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self.teacher = FrozenCopy(model)
        self._groups: list[torch.Tensor] = []  # column indices distilled together (one softmax each)

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        old = [t.classes for t in self.ctx.stream.tasks[: task.index]]
        if self.ctx.setting == TASK_IL:
            groups = old
        else:
            groups = [[c for classes in old for c in classes]] if old else []
        self._groups = [torch.tensor(g, dtype=torch.long, device=self.device) for g in groups]
        self._unseen = self.class_task > task.index  # classes of future tasks (Class-IL CE mask)
        if self.teacher.ready:
            self.warm_up(task)

    def warm_up(self, task: Task) -> None:
        """Train only the classifier on the new classes, features frozen (Li & Hoiem's warm-up)."""
        o, ctx = self.options, self.ctx
        epochs = ctx.epochs if o.warmup_epochs is None else o.warmup_epochs
        if epochs == 0:
            return
        head = self.model.head
        opt = torch.optim.SGD(head.parameters(), lr=o.warmup_lr or o.lr)
        other = self.class_task != task.index
        x_all, y_all = task.train.x, task.train.y
        n, bs = len(task.train), ctx.batch_size
        was_training = self.model.training
        self.model.eval()  # frozen features, BatchNorm statistics untouched (as Mammoth)
        try:
            for _ in range(epochs):
                perm = torch.randperm(n, device=self.device)
                for start in range(0, n, bs):
                    idx = perm[start : start + bs]
                    with torch.no_grad():
                        feats = self.model.features(ctx.augment.train(x_all[idx]))
                    logits = head(feats).masked_fill(other, float("-inf"))
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(logits, y_all[idx]).backward()
                    opt.step()
                self.count_samples(forward=n)
        finally:
            self.model.train(was_training)

    def step_loss(self, batch: Batch) -> StepLoss:
        out = self.model(batch.x)
        if self.ctx.setting == TASK_IL:
            loss = self.loss(out, batch.y, batch.task_id)
        else:
            loss = F.cross_entropy(out.masked_fill(self._unseen, float("-inf")), batch.y)
        if self.teacher.ready and self._groups and self.options.alpha > 0:
            loss = loss + self.options.alpha * self.distill(out, self.teacher(batch.x))
        return StepLoss(loss, StepOutputs(batch, out, batch.y.shape[0]))

    def distill(self, out: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """The distillation term over the old classes (one softmax per group, summed)."""
        T = self.options.temperature
        return sum(distillation(out[:, g], old[:, g], T) for g in self._groups)

    def end_task(self, task: Task) -> None:
        self.teacher.snapshot()

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
