"""PackNet (``packnet``, Mallya & Lazebnik, CVPR 2018): iterative pruning packs one task after
another into a single network, Task-IL only.

For task t:

1. train on the task with every weight no earlier task owns (earlier tasks' weights take part in
   the forward pass but are frozen bit-exactly by :class:`~sparsecl.sparse.ownership.FrozenGuard`);
2. prune: in each layer keep, among those free weights, the largest by magnitude — a share
   ``keep_fraction`` of them (default ``1 / tasks left``, so the capacity is split evenly and the
   last task takes the rest) — and zero the others;
3. retrain the kept weights for ``retrain_epochs`` with the pruned ones held at zero;
4. give the kept weights to task t (:class:`~sparsecl.sparse.ownership.TaskOwnership`) and freeze them.

At test time task j runs with the weights of tasks <= j only, its own head, and the BatchNorm
statistics, BN affine parameters and biases as they were when task j finished (these small shared
tensors are not isolated by pruning, so a per-task copy keeps every earlier task's accuracy exact).
Isolated layers: every convolution and linear weight of the backbone (stem and shortcuts included,
as PackNet prunes all layers); per-task heads are frozen whole once their task is done.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, ContinualMethod, MethodOptions, TaskSubnetworks, register_method
from sparsecl.methods.phases import run_epochs
from sparsecl.sparse.masks import MaskSet, topk_mask
from sparsecl.sparse.ownership import FrozenGuard, TaskOwnership
from sparsecl.sparse.policy import MaskPolicy


@dataclass
class PackNetOptions(MethodOptions):
    lr: float = 0.1
    keep_fraction: float | None = None  # share of the free weights each task keeps; None = 1 / tasks left
    retrain_epochs: int = 1

    def validate(self) -> None:
        super().validate()
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise SparseCLError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.retrain_epochs < 0:
            raise SparseCLError(f"retrain_epochs must be >= 0, got {self.retrain_epochs}")


@register_method
class PackNet(TaskSubnetworks, ContinualMethod, sparse_kernels=True):
    """Prune-and-freeze parameter isolation with per-task heads (Task-IL only)."""

    name = "packnet"
    description = "PackNet: per-task magnitude pruning of free weights, retrain, freeze (Task-IL)"
    options_cls = PackNetOptions
    settings = frozenset({TASK_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self.mask_scope = "conv-linear+first+shortcuts"
        names = MaskPolicy("conv-linear", include_first=True, include_shortcuts=True).select(model)
        self.ownership = TaskOwnership(model, names)
        self.isolated = set(names)
        # Heads frozen whole once their task is done; the small shared tensors (BN affine and
        # running statistics, biases) snapshotted per task.
        self.split_task_heads(model, self.isolated)
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self._guard: FrozenGuard | None = None
        self._saved: dict[str, torch.Tensor] | None = None  # training weights during evaluation
        self._view: int | None = None  # task whose weights are loaded for evaluation
        self._retrain_masks: MaskSet | None = None  # in force while the pruned network retrains

    # ------------------------------------------------------------------ training
    def _frozen(self, task: int) -> dict[str, torch.Tensor]:
        return {**self.ownership.frozen_masks(task), **self.frozen_heads(task)}

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self._guard = FrozenGuard(self.model, self._frozen(task.index))
        self._guard.hook_optimizer(self.optimizer)

    def end_task(self, task: Task) -> None:
        self._pack(task, self._keep(task))

    def _keep(self, task: Task) -> dict[str, torch.Tensor]:
        """Per isolated layer, the free weights task ``task`` keeps: the largest by magnitude, a
        share ``keep_fraction`` (default ``1 / tasks left``) of the free ones."""
        tasks_left = self.ctx.stream.n_tasks - task.index
        share = self.options.keep_fraction if self.options.keep_fraction is not None else 1.0 / tasks_left
        params = dict(self.model.named_parameters())
        keep: dict[str, torch.Tensor] = {}
        for n in self.ownership.names:
            free = self.ownership.free(n)
            k = math.ceil(share * int(free.sum()))
            keep[n] = topk_mask(params[n].detach().abs().masked_fill(~free, -1.0), k)
        return keep

    def _pack(self, task: Task, keep: dict[str, torch.Tensor]) -> None:
        """Prune the free weights outside ``keep`` (retraining the kept ones), give the kept ones
        to the task, freeze them and snapshot the task's shared tensors."""
        params = dict(self.model.named_parameters())
        pruned_any = any(bool((self.ownership.free(n) & ~keep[n]).any()) for n in keep)
        if pruned_any and self.options.retrain_epochs > 0:
            self._retrain(task, keep)
        else:
            with torch.no_grad():
                for n in keep:
                    params[n].mul_(~(self.ownership.free(n) & ~keep[n]))
        self._guard.unhook()
        self.ownership.assign_all_(keep, task.index)
        self.snapshots.append({n: v.detach().clone() for n, v in self._shared_state().items()})

    def _fresh_optimizer(self, task: Task, params=None) -> None:
        """A new optimiser (over ``params``, default the model's) guarded like the task's first."""
        self._guard.unhook()
        self.optimizer = self.make_optimizer(params)
        self._guard = FrozenGuard(self.model, self._frozen(task.index))
        self._guard.hook_optimizer(self.optimizer)

    def _retrain(self, task: Task, keep: dict[str, torch.Tensor]) -> None:
        """Fine-tune the kept weights with the pruned ones held at zero (own short loop)."""
        self._fresh_optimizer(task)
        allowed = {n: ~(self.ownership.free(n) & ~keep[n]) for n in keep}
        masks = MaskSet(self.model, allowed, mask_grads=True)
        for n in keep:  # only the kept free weights train (the guard zeroes the frozen ones' gradients)
            masks.set_grad_mask(n, keep[n], push=False)
        masks.apply_()
        masks.hook_optimizer(self.optimizer)
        self._retrain_masks = masks
        run_epochs(self, task.train, task.index, self.options.retrain_epochs)
        masks.unhook()
        self._retrain_masks = None

    @property
    def execution_masks(self) -> MaskSet | None:
        """The retraining masks while the pruned network retrains; else dense training and the views."""
        return self._retrain_masks if self._retrain_masks is not None else super().execution_masks

    # ---------------------------------------------------------------- evaluation
    def _view_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self._model_tensors()
        return {n: tensors[n] for n in [*self.isolated, *self.shared_names]}

    @torch.no_grad()
    def _use_task(self, j: int) -> None:
        """Weights of tasks <= j (others zero) and task j's shared tensors; a task not finished yet
        sees the network as it is now, the one its training starts from (before any task: the
        random-init network, the forward-transfer reference, not an all-zero backbone; after a
        prune the free weights are zero anyway)."""
        state = self._model_tensors()
        done = j < len(self.snapshots)
        for n in self.isolated:
            state[n].copy_(self._saved[n] * self._view_mask(n, j) if done else self._saved[n])
        shared = self.snapshots[j] if done else self._saved
        for n in self.shared_names:
            state[n].copy_(shared[n])
        self._view = j

    def _view_mask(self, name: str, j: int) -> torch.Tensor:
        """The weights of ``name`` finished task ``j`` runs with: those of tasks ``<= j``."""
        return self.ownership.owned(name, upto=j)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"ownership": self.ownership.state_dict(), "snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        self.ownership.load_state_dict(state["ownership"])
        self.snapshots = [{n: v.to(self.device) for n, v in s.items()} for s in state["snapshots"]]
