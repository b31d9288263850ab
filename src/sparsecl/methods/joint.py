"""Joint training (``joint``): the upper bound, trained on the union of all data seen so far."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecl.data.stream import Split, Task
from sparsecl.methods.base import Batch, ContinualMethod, MethodOptions, StepLoss, StepOutputs, register_method


@dataclass
class JointOptions(MethodOptions):
    reset: bool = True  # re-initialise the model before each task's joint training
    only_last: bool = False  # train only once, on everything, at the last task (Mammoth's JOINT)


@register_method
class Joint(ContinualMethod, graph_capturable=True, distributed=True):
    """At task t, trains on the concatenated training data of tasks 0..t.

    With ``reset`` (default) each row of the accuracy matrix is a model trained from scratch on all
    data so far, so the last row is the classic joint upper bound. ``only_last`` skips training on
    the earlier tasks (their rows then show an untrained model), which is the cheapest way to get
    the final number.
    """

    name = "joint"
    description = "joint: trains on the union of all tasks seen so far (upper bound)"
    options_cls = JointOptions

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self._init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def begin_task(self, task: Task) -> None:
        if self.options.reset and task.index > 0:
            self.model.load_state_dict(self._init_state)
        super().begin_task(task)

    def train_split(self, task: Task) -> Split:
        if self.options.only_last and task.index < self.ctx.stream.n_tasks - 1:
            empty = task.train.x[:0]
            return Split(empty, task.train.y[:0])
        seen = self.ctx.stream.tasks[: task.index + 1]
        return Split(torch.cat([t.train.x for t in seen]), torch.cat([t.train.y for t in seen]))

    def step_loss(self, batch: Batch) -> StepLoss:
        # Samples come from several tasks: Task-IL masking needs each sample's own task.
        out = self.net(batch.x)
        return StepLoss(self.loss(out, batch.y, self.class_task[batch.y]), StepOutputs(batch, out, batch.y.shape[0]))
