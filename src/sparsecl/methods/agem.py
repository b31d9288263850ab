"""Averaged Gradient Episodic Memory (``a-gem``).

Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient Lifelong Learning with A-GEM", ICLR 2019.
Each step computes the gradient ``g`` of the current batch's loss and a reference gradient ``g_ref``
of the loss on a minibatch drawn from the episodic memory; if they conflict (``g . g_ref < 0``) the
applied gradient is the projection ``g - (g . g_ref / g_ref . g_ref) g_ref``, which has zero dot
product with ``g_ref``; otherwise ``g`` is applied unchanged. Gradients are handled as one flat
vector on the device; the test is branch-free (``torch.where``), so there is no host sync.

Memory (option ``memory``):

* ``"task"`` (default, the paper's episodic memory): at the end of each task,
  ``buffer_size // n_tasks`` examples drawn uniformly from that task's training data are stored;
  the memory holds only *past* tasks.
* ``"batch"`` (Mammoth's ``agem``, whose A-GEM numbers the DER paper and SparCL's Table 1 report):
  at the end of each task one training batch (``batch_size`` random examples of the task) is
  stored, whatever ``buffer_size`` is (it must hold ``n_tasks`` batches).
* ``"reservoir"`` (Mammoth's ``agem_r``): every batch is offered to the reservoir buffer, as ER
  does, so the memory also holds examples of the current task.

The reference minibatch has ``minibatch_size`` examples (default the batch size), augmented when
drawn. The returned loss is the current batch's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import Batch, register_method
from sparsecl.methods.er import ReplayMethod, ReplayOptions

MEMORY_KINDS = ("task", "batch", "reservoir")


@dataclass
class AGEMOptions(ReplayOptions):
    lr: float = 0.03
    memory: str = "task"  # task (the paper's per-task memory) | batch (Mammoth's agem) | reservoir (agem_r)

    def validate(self) -> None:
        super().validate()
        if self.memory not in MEMORY_KINDS:
            raise SparseCLError(f"unknown memory {self.memory!r} (known: {', '.join(MEMORY_KINDS)})")


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's update: ``g`` if ``g . g_ref >= 0``, else ``g`` minus its component along ``g_ref``."""
    dot = torch.dot(g, g_ref)
    ref_sq = torch.dot(g_ref, g_ref)
    # dot < 0 implies ref_sq > 0; the clamp only keeps the unused branch finite.
    coef = torch.where(dot < 0, dot / ref_sq.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(dot))
    return g - coef * g_ref


@register_method
class AGEM(ReplayMethod, graph_capturable=False):
    """Gradient projection so that the loss on the episodic memory does not increase (to first order)."""

    name = "a-gem"
    description = "A-GEM (Chaudhry et al. 2019): project the gradient when it conflicts with a memory gradient"
    options_cls = AGEMOptions

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        if options.memory == "batch" and options.buffer_size < ctx.batch_size * ctx.stream.n_tasks:
            raise SparseCLError(f"memory=batch stores one batch per task: buffer_size must be >= "
                                f"{ctx.batch_size} x {ctx.stream.n_tasks} tasks, got {options.buffer_size}")
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._numels = [p.numel() for p in self._params]

    def _flat_grad(self, loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self._params, materialize_grads=True)
        return torch.cat([g.reshape(-1) for g in grads])

    def observe(self, batch: Batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(batch.x), batch.y, batch.task_id)
        if self.buffer.is_empty:
            loss.backward()
        else:
            g = self._flat_grad(loss)
            bx, by, bt = self.draw("y", "task")
            g_ref = self._flat_grad(self.loss(self.model(bx), by, bt))
            update = project(g, g_ref)
            for p, v in zip(self._params, update.split(self._numels)):
                p.grad = v.view_as(p)
        self.optimizer.step()
        if self.options.memory == "reservoir":
            self.remember(batch)
        return loss.detach()

    def end_task(self, task: Task) -> None:
        if self.options.memory == "reservoir":
            return
        per_task = self.ctx.batch_size if self.options.memory == "batch" else self.buffer.capacity // self.ctx.stream.n_tasks
        k = min(per_task, len(task.train))
        if k == 0:
            return
        idx = torch.randperm(len(task.train), device=self.device)[:k]
        y = task.train.y[idx]
        # The reservoir keeps every example while it is not full; k * n_tasks <= capacity.
        self.buffer.add(x=task.train.x[idx], y=y, task=torch.full_like(y, task.index))
