"""Function Distance Regularisation (``fdr``, Benjamin, Rolnick & Kording, "Measuring and
regularizing networks in function space", ICLR 2019; the DER paper's and SparCL Table 1's FDR).

A memory holds, for every finished task, examples of its training data together with the outputs
the network gave them when the task ended. Training a new task alternates two optimiser steps per
batch: cross-entropy on the current batch, then the function distance on a memory minibatch,

    alpha * mean_i || softmax(f(x_i)) - softmax(z_i) ||_2,

the L2 distance in output (probability) space between the network now and the network that
stored ``z_i``. It is zero where the network still computes the stored function and grows with
the distance (:func:`function_distance`).

Choices where the paper is silent, taken from the authors' reference implementation in Mammoth
(``models/fdr.py``, which the DER paper's and SparCL's FDR numbers come from):

- the memory is split evenly: after task ``t`` each task keeps ``buffer_size // t`` examples (the
  earlier tasks' first ones are kept, the rest dropped) and the task just finished adds as many of
  its training examples, drawn at random;
- two separate optimiser steps (task loss, then distance) rather than one summed loss;
- the minibatch of memory examples is drawn at random and augmented like training data.

Differences, on purpose: Mammoth parses ``alpha`` but never uses it (its distance step is
unweighted), so its published FDR numbers are ``alpha = 1``; here ``alpha`` weights the distance
step (the paper's lambda) and the presets set it to 1 to match those numbers. Mammoth stores the
logits of the augmented view in train mode; we store those of the non-augmented image in eval mode
(the function the task ended with, without augmentation noise or BatchNorm batch statistics).
In the Task-IL setting both softmaxes run over each stored example's own task's classes (the
engine's per-task cross-entropy), in Class-IL over all classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, Batch, ContinualMethod, register_method
from sparsecl.methods.er import ReplayOptions


def function_distance(probs: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of the L2 distance between two batches of output probabilities."""
    return torch.linalg.vector_norm(probs - stored, ord=2, dim=1).mean()


class TaskMemory:
    """Per-task examples with their stored logits, split evenly over the tasks seen (FDR's memory)."""

    FIELDS = ("x", "logits", "task")

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = int(capacity)
        self.device = device
        self.data: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return 0 if self.data is None else int(self.data["task"].shape[0])

    @property
    def is_empty(self) -> bool:
        return len(self) == 0

    def add_task(self, task_id: int, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Shrink every earlier task to ``capacity // tasks`` examples and add task ``task_id``'s."""
        per_task = self.capacity // (task_id + 1)
        new = {"x": x[:per_task], "logits": logits[:per_task],
               "task": torch.full((min(per_task, x.shape[0]),), task_id, dtype=torch.long, device=x.device)}
        if self.data is not None:
            keep = torch.cat([torch.nonzero(self.data["task"] == t).flatten()[:per_task] for t in range(task_id)])
            new = {k: torch.cat([self.data[k][keep], new[k]]) for k in self.FIELDS}
        self.data = new

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` distinct stored examples at random: (uint8 inputs, logits, task ids)."""
        idx = torch.randperm(len(self), device=self.device)[:n]
        return tuple(self.data[k][idx] for k in self.FIELDS)  # type: ignore[return-value]

    def nbytes(self) -> int:
        """Bytes held by the stored examples and logits (for the memory footprint)."""
        return 0 if self.data is None else sum(t.numel() * t.element_size() for t in self.data.values())

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state["data"]
        self.data = None if data is None else {k: v.to(self.device) for k, v in data.items()}


@dataclass
class FDROptions(ReplayOptions):
    """``buffer_size``: the memory over all tasks; ``minibatch_size``: memory examples per distance step."""

    lr: float = 0.03
    alpha: float = 1.0  # weight of the function-distance step (Mammoth's FDR: effectively 1)

    def validate(self) -> None:
        super().validate()
        if self.alpha < 0:
            raise SparseCLError(f"alpha must be >= 0, got {self.alpha}")


@register_method
class FDR(ContinualMethod):
    """A task step on the current batch, then a function-distance step on stored outputs."""

    name = "fdr"
    description = "FDR: function-distance regularisation to stored outputs of earlier tasks (alpha)"
    options_cls = FDROptions

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self.buffer = TaskMemory(options.buffer_size, ctx.device)
        self.minibatch = options.minibatch_size or ctx.batch_size

    def probabilities(self, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes the setting compares (Task-IL: each row's own task's)."""
        if self.ctx.setting == TASK_IL:
            logits = self.mask_logits(logits, task_ids)
        return F.softmax(logits.float(), dim=1)

    def penalty(self, x: torch.Tensor, stored: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``alpha`` times the function distance of the network on ``x`` to the ``stored`` logits."""
        return self.options.alpha * function_distance(self.probabilities(self.net(x), task_ids),
                                                  self.probabilities(stored, task_ids))

    def observe(self, batch: Batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.net(batch.x), batch.y, batch.task_id)
        loss.backward()
        self.optimizer.step()
        if self.buffer.is_empty or self.options.alpha == 0:
            return loss.detach()
        x_raw, stored, task_ids = self.buffer.sample(self.minibatch)
        self.ctx.note_replay(int(x_raw.shape[0]))
        self.optimizer.zero_grad(set_to_none=True)
        distance = self.penalty(self.ctx.augment.train(x_raw), stored, task_ids)
        distance.backward()
        self.optimizer.step()
        return loss.detach() + distance.detach()

    @torch.no_grad()
    def end_task(self, task: Task) -> None:
        """Store random training examples of the task with the network's outputs on them."""
        split = task.train
        n = min(self.options.buffer_size // (task.index + 1), len(split))
        idx = torch.randperm(len(split), device=self.device)[:n]
        x_raw = split.x[idx]
        was = self.model.training
        self.model.eval()
        logits = torch.cat([self.model(self.ctx.augment.eval(x_raw[s:s + 256])) for s in range(0, n, 256)]) \
            if n else torch.zeros(0, self.model.n_classes, device=self.device)
        self.model.train(was)
        self.buffer.add_task(task.index, x_raw, logits.float())

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
