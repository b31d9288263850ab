"""Continual dynamic sparse training (``continual-dst``; M. O. Yildirim, E. C. Gok Yildirim, G. Sokar,
D. C. Mocanu, J. Vanschoren, "Continual Learning with Dynamic Sparse Training: Exploring Algorithms
for Effective Model Updates", CPAL 2024), Task-IL only.

Every isolated layer (all conv and linear weights of the backbone) has one shared weight tensor.
A weight is *free* until a task trains it, then *frozen* and owned by that task
(:class:`~sparsecl.sparse.ownership.TaskOwnership`). For task t (SPEC, "Continual DST"):

1. **Mask** ``M_t``: per layer exactly ``count_l`` weights, ``count_l`` from the ``init``
   allocation (``uniform`` or ``erk``, exact counts, :func:`~sparsecl.sparse.allocation.allocate`)
   at per-task density ``d = 1 - sparsity``, drawn uniformly at random over **all** weights of the
   layer (our reading of the paper's random sparse initialisation: the draw does not prefer free or
   frozen weights). So ``M_t`` may contain frozen weights of earlier tasks (reused: they keep their
   values, take part in the forward pass and are never updated) and free ones (trained; they start
   from the backbone's initial random values, kept from construction, as in a freshly initialised
   sparse network).
2. **Forward** through exactly ``M_t``: the live parameter holds the values of ``M_t`` and zero
   everywhere else (a :class:`~sparsecl.sparse.masks.MaskSet` whose mask is ``M_t``); the values of
   all frozen weights live in a separate backbone store. A
   :class:`~sparsecl.sparse.ownership.FrozenGuard` over the frozen weights in ``M_t`` writes the
   store's values back after every Adam step (bit-identical); gradients reach only ``M_t``'s free
   weights (gradient mask), except under momentum growth (below).
3. **Topology update** every ``delta_t`` optimiser steps while ``step < T_end`` (= the task's
   steps): per layer drop the ``floor(f(step) * |M_t|)`` weights of ``M_t`` with the smallest
   ``|w|`` (frozen ones included: dropping one only means task t stops using it), with
   ``f = alpha / 2 * (1 + cos(pi * step / T_end))``, and regrow as many outside the kept mask
   (:func:`~sparsecl.sparse.growth.drop_and_grow_`) by ``random`` / ``unfired`` / ``gradient``
   (``|dense gradient|`` of the update step) / ``momentum`` (Adam's normalised first moment
   ``m / (sqrt(v) + eps)``, as the authors' code ranks). A regrown frozen weight gets its stored
   value back; a regrown free one starts at zero with zero Adam state. ``|M_t|`` stays exact.
4. After the task the free weights of ``M_t`` are stored and owned by t; ``M_t`` is kept (one
   bool mask per layer and task) with the task's head, which is frozen from then on.

Evaluation of task j: ``M_j`` over the stored values, nothing else, with task j's head. For a task
whose mask does not exist yet (forward transfer's ``R[j-1][j]``, and the random-init reference
before task 1) the model evaluated is the latest finished task's subnetwork (``M_{j-1}`` after task
j-1; before any training the random ``M_1`` drawn at construction, at its initial values) with
task j's untrained head. Between tasks the live model holds the whole stored backbone and the
mask set the union of the masks, so the saved ``model.pt`` and its masks have every task's weights
(the export keeps them) and each task's export view is it times ``M_j``.

BatchNorm and biases: shared and trainable by default (the paper's; ``per_task_bn=false``): every
task's evaluation uses the latest running statistics and affine parameters, so BWT is measured,
not zero by construction. ``per_task_bn=true`` keeps a copy of the BN statistics, BN affine
parameters and biases per task (as they were when the task finished) for its evaluation; every
earlier task's accuracy then is exactly unchanged.

``unfired`` growth picks at random among weights outside ``M_t`` that have not been in ``M_t`` at
any point of this task (``unfired=task``, the default, as the authors' code resets its record per
task), or that no task's mask ever held (``unfired=run``); if fewer than the update needs are left,
the rest is grown at random among the other candidates, so ``|M_t|`` stays exact.

Gradient masking and FLOPs: the weight-gradient half of the backward is charged at the density of
``M_t``'s free weights (the only ones that need a gradient). Gradient-growth update steps compute
the dense gradient: they are charged a dense weight gradient (set before the step's forward, as
RigL-DER++ does). Momentum growth needs first moments of every weight outside ``M_t``, so its
gradients are not masked (the guard still zeroes those of ``M_t``'s frozen weights) and every step
is charged a dense weight gradient.

Growth: ``grow`` is one mode for every task, or an adaptive per-task schedule
``"random:5,gradient:5"`` (tasks 1-5 random, 6-10 gradient). The counts must add up to the
number of tasks exactly; the last entry may omit its count (``"random:2,gradient"``) to cover
all remaining tasks. Anything else is a one-line error.

Optimiser (the paper's): Adam, lr 1e-3, multiplied by 0.1 at 1/2 and 3/4 of the epochs
(``lr_milestones``), re-created at every task; batch 128 (presets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, Batch, ContinualMethod, MethodOptions, TaskSubnetworks, register_method
from sparsecl.sparse.allocation import ALLOCATIONS, allocate, check_sparsity
from sparsecl.sparse.growth import GROWTH_MODES, cosine_update_fraction, drop_and_grow_, optimizer_momentum
from sparsecl.sparse.masks import MaskSet, random_mask
from sparsecl.sparse.ownership import FrozenGuard, TaskOwnership
from sparsecl.sparse.policy import MaskPolicy

UNFIRED_SCOPES = ("task", "run")


def parse_growth_schedule(spec: str, n_tasks: int | None = None) -> list[str]:
    """Growth mode per task from ``"gradient"`` or ``"random:5,gradient:5"`` / ``"random:2,gradient"``.

    Without ``n_tasks`` only the syntax and modes are checked (an empty list is returned for a
    schedule). Raises :class:`SparseCLError` (one line) for an unknown mode, a bad count, or counts
    that do not add up to ``n_tasks`` (a last entry without a count takes the remaining tasks).
    """
    known = ", ".join(GROWTH_MODES)
    parts = [p.strip() for p in str(spec).split(",")]
    if not parts or any(not p for p in parts):
        raise SparseCLError(f"grow {spec!r}: expected a mode ({known}) or a schedule like random:5,gradient:5")
    entries: list[tuple[str, int | None]] = []
    for i, p in enumerate(parts):
        mode, sep, count = p.partition(":")
        mode = mode.strip()
        if mode not in GROWTH_MODES:
            raise SparseCLError(f"grow {spec!r}: unknown growth mode {mode!r} (known: {known})")
        if not sep:
            if len(parts) > 1 and i != len(parts) - 1:
                raise SparseCLError(f"grow {spec!r}: only the last entry may omit its task count ({mode}:N)")
            entries.append((mode, None))
            continue
        try:
            c = int(count)
        except ValueError:
            raise SparseCLError(f"grow {spec!r}: task count {count!r} of {mode} is not an integer") from None
        if c < 1:
            raise SparseCLError(f"grow {spec!r}: task count of {mode} must be >= 1, got {c}")
        entries.append((mode, c))
    if n_tasks is None:
        return []
    fixed = sum(c for _, c in entries if c is not None)
    open_end = entries[-1][1] is None
    if fixed > n_tasks or (not open_end and fixed != n_tasks) or (open_end and fixed == n_tasks and len(entries) > 1):
        raise SparseCLError(f"grow {spec!r}: task counts add up to {fixed}, the benchmark has {n_tasks} tasks"
                            + ("" if open_end else f" (end with a mode without count, e.g. ...,{entries[-1][0]}, "
                                                   "to cover the remaining tasks)"))
    modes: list[str] = []
    for mode, c in entries:
        modes += [mode] * (c if c is not None else n_tasks - fixed)
    return modes


@dataclass
class ContinualDSTOptions(MethodOptions):
    lr: float = 1e-3
    optimizer: str = "adam"
    sparsity: float = 0.9  # per task: M_t holds 1 - sparsity of every isolated layer
    init: str = "uniform"  # uniform | erk: per-layer allocation of M_t
    grow: str = "gradient"  # random | unfired | gradient | momentum, or a schedule random:5,gradient:5
    unfired: str = "task"  # task: not yet in M_t during this task (authors' code) | run: in no task's mask ever
    delta_t: int = 100  # optimiser steps between topology updates (paper: 50, 100, 200, 400)
    drop_fraction: float = 0.5  # alpha of the cosine schedule (paper: 0.5)
    per_task_bn: bool = False  # per-task copies of BN statistics/affine and biases for evaluation
    lr_milestones: str = "0.5,0.75"  # fractions of the epochs after which lr is multiplied by 0.1; "" = none
    train_samples: int = 0  # >0: train each epoch on this many random examples of the task (budget runs)

    def validate(self) -> None:
        super().validate()
        check_sparsity(self.sparsity)
        if self.init not in ALLOCATIONS:
            raise SparseCLError(f"unknown init {self.init!r} (known: {', '.join(ALLOCATIONS)})")
        parse_growth_schedule(self.grow)
        if self.unfired not in UNFIRED_SCOPES:
            raise SparseCLError(f"unknown unfired scope {self.unfired!r} (known: {', '.join(UNFIRED_SCOPES)})")
        if self.delta_t < 1:
            raise SparseCLError(f"delta_t must be >= 1, got {self.delta_t}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise SparseCLError(f"drop_fraction must lie in [0, 1], got {self.drop_fraction}")
        self.milestones()
        if self.train_samples < 0:
            raise SparseCLError(f"train_samples must be >= 0 (0 = all), got {self.train_samples}")
        uses_momentum = "momentum" in str(self.grow)
        if uses_momentum and self.optimizer == "sgd" and self.momentum == 0:
            raise SparseCLError("grow=momentum needs an optimiser with momentum (adam, or sgd with -o momentum=0.9)")

    def milestones(self) -> list[float]:
        """``lr_milestones`` as sorted fractions in (0, 1]."""
        s = str(self.lr_milestones).strip()
        if not s:
            return []
        try:
            out = sorted(float(v) for v in s.split(","))
        except ValueError:
            raise SparseCLError(f"lr_milestones {self.lr_milestones!r}: expected comma-separated fractions like 0.5,0.75") from None
        if any(not 0 < v <= 1 for v in out):
            raise SparseCLError(f"lr_milestones {self.lr_milestones!r}: fractions must lie in (0, 1]")
        return out


@register_method
class ContinualDST(TaskSubnetworks, ContinualMethod, sparse_kernels=True):
    """Per-task sparse subnetworks over all weights, reusing frozen ones, found by drop-and-grow (Task-IL)."""

    name = "continual-dst"
    description = "Continual DST: per-task sparse subnetworks (reusing frozen weights) by drop-and-grow (Task-IL)"
    options_cls = ContinualDSTOptions
    settings = frozenset({TASK_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self.growth = parse_growth_schedule(options.grow, ctx.stream.n_tasks)
        self.mask_scope = "conv-linear+first+shortcuts"
        names = MaskPolicy("conv-linear", include_first=True, include_shortcuts=True).select(model)
        self.names = names
        self.ownership = TaskOwnership(model, names)
        params = dict(model.named_parameters())
        self.counts = allocate(options.init, {n: tuple(params[n].shape) for n in names}, 1.0 - options.sparsity)
        self.split_task_heads(model, names)
        # The backbone's initial values: a free weight entering a task's mask starts from them.
        self.init_values = {n: params[n].detach().clone() for n in names}
        # Values of the frozen weights (0 where free); the live parameter holds only M_t's.
        self.backbone = {n: torch.zeros_like(params[n]) for n in names}
        self.task_masks: list[dict[str, torch.Tensor]] = []  # M_j of every finished task
        self.snapshots: list[dict[str, torch.Tensor]] = []  # per_task_bn: shared tensors after task j
        self.history: list[dict[str, Any]] = []  # per finished task: usage, reuse, updates
        self.current_task = -1  # task index the live mask M_t belongs to
        self.step = 0  # optimiser steps in the current task
        self.t_end = 0
        self.updates = 0  # topology updates in the current task
        self._guard: FrozenGuard | None = None
        self._saved: dict[str, torch.Tensor] | None = None
        self._view: int | None = None
        self.masks = MaskSet(model, {n: torch.zeros_like(params[n], dtype=torch.bool) for n in names})
        # Task 0's mask exists before training: the random-init reference of forward transfer is
        # the sparse random network M_1, not an all-zero backbone.
        self._draw_mask(0)

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def _draw_mask(self, task: int) -> None:
        """Draw ``M_task`` at random over all weights; load frozen values and initial values of free ones."""
        for n in self.names:
            p = self.masks.params[n]
            m = random_mask(p.shape, self.counts[n], device=p.device)
            start = torch.where(self.ownership.owned(n), self.backbone[n], self.init_values[n])
            p.copy_(torch.where(m, start, torch.zeros_like(p)))
            self.masks.set_mask(n, m, count=self.counts[n], push=False)
        self.masks.push_flops()
        self.current_task = task

    def _reused(self, name: str) -> torch.Tensor:
        """Frozen weights of earlier tasks in the live mask M_t."""
        return self.masks.masks[name] & self.ownership.owned(name)

    def growth_mode(self, task: int) -> str:
        """Growth mode used in ``task`` (the adaptive schedule's entry, or the fixed mode)."""
        return self.growth[task]

    def _task_steps(self, task: Task) -> int:
        n = len(self.train_split(task))
        if self.options.train_samples:
            n = min(n, self.options.train_samples)
        return math.ceil(n / self.ctx.batch_size) * self.ctx.epochs

    def _set_grad_masks(self) -> None:
        """Gradients reach M_t's free weights only, except under momentum growth (dense moments)."""
        if self.growth_mode(self.current_task) != "momentum":
            for n in self.names:
                self.masks.set_grad_mask(n, self.masks.masks[n] & self.ownership.free(n), push=False)
            self.masks.push_flops()
            return
        # Momentum growth ranks every weight outside M_t by its first moment, so every weight gets
        # a gradient (the guard zeroes the frozen ones of M_t; the mask zeroes the weights outside
        # M_t after each step): a dense weight gradient at every step.
        self.masks.clear_grad_masks()
        self.masks.push_flops(dense_grad=True)

    # ------------------------------------------------------------------ training
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if self.current_task != task.index:
            self._draw_mask(task.index)
        if self.options.unfired == "task":
            self.masks.reset_ever_active_()
        self.masks.bind_flops(self.ctx.flops)
        self._set_grad_masks()
        frozen = {**{n: self._reused(n) for n in self.names}, **self.frozen_heads(task.index)}
        self._guard = FrozenGuard(self.model, frozen, values=self.backbone)
        self._guard.hook_optimizer(self.optimizer)
        self.masks.hook_optimizer(self.optimizer)
        self.step, self.updates = 0, 0
        self.t_end = self._task_steps(task)

    def epoch_indices(self, task: Task, epoch: int) -> torch.Tensor | None:
        n = len(self.train_split(task))
        if not self.options.train_samples or self.options.train_samples >= n:
            return None
        return torch.randperm(n, device=self.device)[: self.options.train_samples]

    def observe(self, batch: Batch) -> torch.Tensor:
        t = self.step + 1
        due = t % self.options.delta_t == 0 and t < self.t_end
        gradient = due and self.growth_mode(self.current_task) == "gradient"
        if gradient:  # this step computes the dense weight gradient: charge it before its forward
            self.masks.push_flops(dense_grad=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(batch.x), batch.y, batch.task_id)
        loss.backward()
        dense_grads = None
        if gradient:  # the dense gradient of this step, before the optimiser hooks mask it
            params = self.masks.params
            dense_grads = {n: params[n].grad.detach().clone() for n in self.names if params[n].grad is not None}
        self.optimizer.step()
        self.step = t
        if due:
            self._topology_update(dense_grads)
        return loss.detach()

    @torch.no_grad()
    def _topology_update(self, dense_grads: dict[str, torch.Tensor] | None) -> None:
        frac = cosine_update_fraction(self.step, self.options.drop_fraction, self.t_end)
        mode = self.growth_mode(self.current_task)
        for n in self.names:
            k = int(frac * self.masks.active(n))
            if k <= 0:
                continue
            p = self.masks.params[n]
            momentum = optimizer_momentum(self.optimizer, p, normalised=True) if mode == "momentum" else None
            grad = dense_grads.get(n) if dense_grads is not None else None
            drop_and_grow_(self.masks, n, k, mode, grad=grad, momentum=momentum, optimizer=self.optimizer)
            # Frozen weights in the new M_t (kept or regrown) carry their stored values; grown
            # free ones start at 0 (drop_and_grow_ zeroed them).
            reused = self._reused(n)
            p.copy_(torch.where(reused, self.backbone[n], p))
            self._guard.set_frozen_(n, reused)
        self._set_grad_masks()
        self.updates += 1

    def end_epoch(self, task: Task, epoch: int) -> None:
        # Step-down schedule: lr * 0.1 per milestone reached by the next epoch (paper: 1/2, 3/4).
        e = epoch + 1
        if e >= self.ctx.epochs:
            return
        factor = 0.1 ** sum(e >= m * self.ctx.epochs for m in self.options.milestones())
        for group in self.optimizer.param_groups:
            group["lr"] = self.options.lr * factor

    @torch.no_grad()
    def end_task(self, task: Task) -> None:
        t = task.index
        self._guard.unhook()
        self.masks.unhook()
        self.masks.clear_grad_masks()
        mask = {n: self.masks.masks[n].clone() for n in self.names}
        size = {n: int(m.sum()) for n, m in mask.items()}
        reused = {n: int(self._reused(n).sum()) for n in self.names}
        trained = {n: mask[n] & self.ownership.free(n) for n in self.names}
        self.ownership.assign_all_(trained, t)
        for n in self.names:
            self.backbone[n].copy_(torch.where(trained[n], self.masks.params[n], self.backbone[n]))
            # Between tasks the live model is the whole stored backbone and the mask the union of the
            # task masks, so the saved model and its masks hold every task's weights (the export) and
            # each task's view is it times M_j.
            self.masks.params[n].copy_(self.backbone[n])
            self.masks.set_mask(n, self.ownership.owned(n), push=False)
        self.task_masks.append(mask)
        self.current_task = -1
        if self.options.per_task_bn:
            self.snapshots.append({n: v.detach().clone() for n, v in self._shared_state().items()})
        total = sum(size.values())
        self.history.append({
            "task": t + 1,
            "grow": self.growth_mode(t),
            "mask_weights": size,
            "reused_weights": reused,
            "new_weights": {n: size[n] - reused[n] for n in self.names},
            # Of M_t: the fraction that earlier tasks had trained (reused, frozen) and that t trained.
            "reused_fraction": sum(reused.values()) / total if total else 0.0,
            "new_fraction": 1.0 - sum(reused.values()) / total if total else 0.0,
            "topology_updates": self.updates,
            "usage": self.ownership.usage(),  # fraction of each layer in the union of the masks
            "used_fraction": self.ownership.used_fraction(),
            "free_weights": {n: int(self.ownership.free(n).sum()) for n in self.names},
        })

    # ---------------------------------------------------------------- evaluation
    def _view_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self._model_tensors()
        return {n: tensors[n] for n in [*self.names, *self.shared_names]}

    @torch.no_grad()
    def _use_task(self, j: int) -> None:
        """Task j's mask over the stored values. A task without a mask yet gets the latest finished
        task's mask (before any training: the live model, M_1 at its initial values)."""
        state = self._model_tensors()
        finished = len(self.task_masks)
        for n in self.names:
            if j < finished or (finished and self.current_task < 0):
                mask = self.task_masks[min(j, finished - 1)][n]
                state[n].copy_(torch.where(mask, self.backbone[n], torch.zeros_like(state[n])))
            else:
                state[n].copy_(self._saved[n])
        if self.options.per_task_bn:
            shared = self.snapshots[j] if j < len(self.snapshots) else self._saved
            for n in self.shared_names:
                state[n].copy_(shared[n])
        self._view = j

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        """Per task: M_t's reused (frozen) and newly trained fractions, backbone usage (union of masks)."""
        return {
            "init": self.options.init,
            "sparsity": self.options.sparsity,
            "grow_schedule": list(self.growth),
            "unfired": self.options.unfired,
            "per_task_bn": self.options.per_task_bn,
            "tasks": self.history,
            # First task after which some isolated layer had no free weight left.
            "layer_full_after_task": next((h["task"] for h in self.history
                                           if min(h["free_weights"].values(), default=1) == 0), None),
            # First task after which no isolated weight was free (the whole backbone used).
            "full_after_task": next((h["task"] for h in self.history
                                     if sum(h["free_weights"].values()) == 0), None),
        }

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"ownership": self.ownership.state_dict(), "masks": self.masks.state_dict(),
                "backbone": self.backbone, "task_masks": self.task_masks, "snapshots": self.snapshots,
                "init_values": self.init_values, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.ownership.load_state_dict(state["ownership"])
        self.masks.load_state_dict(state["masks"])
        to = self.device
        self.backbone = {n: v.to(to) for n, v in state["backbone"].items()}
        self.task_masks = [{n: m.to(to) for n, m in s.items()} for s in state["task_masks"]]
        self.snapshots = [{n: v.to(to) for n, v in s.items()} for s in state["snapshots"]]
        self.init_values = {n: v.to(to) for n, v in state["init_values"].items()}
        self.history = list(state["history"])
        self.current_task = -1  # the next task draws its mask in begin_task
