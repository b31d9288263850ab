"""Continual dynamic sparse training (``continual-dst``; Yildirim et al., "Continual Learning with
Dynamic Sparse Training: Exploring Algorithms for Effective Model Updates", CPAL 2024), Task-IL only.

For task t (SPEC, "Continual DST"):

1. **Trainable mask** ``M_t``: per isolated layer ``count_l`` weights among the weights no earlier
   task owns (:func:`~sparsecl.sparse.ownership.trainable_among_free`), ``count_l`` from the
   ``init`` allocation (``uniform`` or ``erk``, exact counts, :func:`~sparsecl.sparse.allocation.allocate`)
   at per-task density ``1 - sparsity``. If a layer has fewer free weights than its count, the task
   takes all that are left (the layer is *saturated*; the report says so). The weights of ``M_t``
   start from the backbone's initial random values (kept from construction), as in a freshly
   initialised sparse network.
2. **Forward** through the union of the frozen weights of tasks ``< t`` and ``M_t``; only ``M_t``
   is updated: a :class:`~sparsecl.sparse.ownership.FrozenGuard` zeroes frozen gradients and
   writes the frozen values back after every Adam step (bit-identical), and the
   :class:`~sparsecl.sparse.masks.MaskSet` (mask = union) keeps every other weight at exactly 0.
3. **Topology update** every ``delta_t`` optimiser steps while ``step < T_end`` (= the task's
   steps): drop by magnitude ``floor(f(step) * |M_t|)`` weights of ``M_t`` per layer, with
   ``f = alpha / 2 * (1 + cos(pi * step / T_end))``, and regrow as many among the *free* weights
   (:func:`~sparsecl.sparse.growth.drop_and_grow_` with ``allowed=free``) by ``random`` /
   ``unfired`` / ``gradient`` / ``momentum``. Frozen weights never take part (their drop score is
   +inf). Grown weights start at zero with zero Adam state.
4. After the task ``M_t`` is given to task t (:class:`~sparsecl.sparse.ownership.TaskOwnership`)
   and frozen with the task's head; the backbone usage per layer is recorded (:meth:`report`).

Growth: ``grow`` is one mode for every task, or an adaptive per-task schedule
``"random:5,gradient:5"`` (tasks 1-5 random, 6-10 gradient). The counts must add up to the
number of tasks exactly; the last entry may omit its count (``"random:2,gradient"``) to cover
all remaining tasks. Anything else is a one-line error.

``unfired`` grows only weights that no task has ever used (never in any task's mask, including
weights a task used and later dropped: the MaskSet's ever-active mask over the union). If fewer
such weights are left than the update would drop, the update drops only as many as it can
regrow, so the task's per-layer count stays exact (it never revives a used weight).

Gradient growth scores the dense gradient of the update step (taken before gradient masking).
Momentum growth uses Adam's ``exp_avg``; for it the free weights' gradients are not masked so
that the first moment exists for them (a dense backward, as the paper notes); otherwise only
``M_t`` receives gradients (gradient density = density of ``M_t``).

Evaluation of task j uses only weights of tasks ``<= j`` (plus the mask being trained if task j
is the current or a future task), task j's head and, with ``per_task_bn`` (default on), the
BatchNorm statistics, BN affine parameters and biases as they were when task j finished: these
small shared tensors stay trainable (the paper does not freeze BN) and a per-task copy keeps every
earlier task's accuracy exact. With ``per_task_bn=false`` all tasks share the latest ones (the
paper's setting; BWT then is small but not exactly zero).

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
from sparsecl.sparse.growth import GROWTH_MODES, cosine_update_fraction, drop_and_grow_
from sparsecl.sparse.masks import MaskSet
from sparsecl.sparse.ownership import FrozenGuard, TaskOwnership, trainable_among_free
from sparsecl.sparse.policy import MaskPolicy


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
    sparsity: float = 0.9  # per task: each task trains 1 - sparsity of every isolated layer
    init: str = "uniform"  # uniform | erk: per-layer allocation of the task's weights
    grow: str = "gradient"  # random | unfired | gradient | momentum, or a schedule random:5,gradient:5
    delta_t: int = 100  # optimiser steps between topology updates (paper: 50, 100, 200, 400)
    drop_fraction: float = 0.5  # alpha of the cosine schedule (paper: 0.5)
    per_task_bn: bool = True  # per-task copies of BN statistics/affine and biases for evaluation
    lr_milestones: str = "0.5,0.75"  # fractions of the epochs after which lr is multiplied by 0.1; "" = none
    train_samples: int = 0  # >0: train each epoch on this many random examples of the task (budget runs)

    def validate(self) -> None:
        super().validate()
        check_sparsity(self.sparsity)
        if self.init not in ALLOCATIONS:
            raise SparseCLError(f"unknown init {self.init!r} (known: {', '.join(ALLOCATIONS)})")
        parse_growth_schedule(self.grow)
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
class ContinualDST(TaskSubnetworks, ContinualMethod):
    """Per-task sparse subnetworks found by drop-and-grow among free weights (Task-IL)."""

    name = "continual-dst"
    description = "Continual DST: per-task sparse subnetworks by drop-and-grow among free weights (Task-IL)"
    options_cls = ContinualDSTOptions
    settings = frozenset({TASK_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        heads = getattr(model.head, "heads", None)
        if heads is None:
            raise SparseCLError("continual-dst needs per-task heads (run it with --setting task-il)")
        self.growth = parse_growth_schedule(options.grow, ctx.stream.n_tasks)
        self.mask_policy = "conv-linear+first+shortcuts"
        names = MaskPolicy("conv-linear", include_first=True, include_shortcuts=True).select(model)
        self.names = names
        self.ownership = TaskOwnership(model, names)
        params = dict(model.named_parameters())
        self.counts = allocate(options.init, {n: tuple(params[n].shape) for n in names}, 1.0 - options.sparsity)
        self.head_params = {t: [f"head.heads.{t}.{n}" for n, _ in h.named_parameters()] for t, h in enumerate(heads)}
        head_names = {n for names_t in self.head_params.values() for n in names_t}
        isolated = set(names)
        self.shared_names = [n for n in params if n not in isolated and n not in head_names]
        self.shared_names += [n for n, _ in model.named_buffers()]
        # The backbone's initial values: a task's new mask starts from them (free weights are 0).
        self.init_values = {n: params[n].detach().clone() for n in names}
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.history: list[dict[str, Any]] = []  # per finished task: usage, counts, updates
        self.current: dict[str, torch.Tensor] | None = None  # M_t of the task being trained
        self.current_task = -1  # task index M_t belongs to
        self.saturated: list[str] = []
        self.step = 0  # optimiser steps in the current task
        self.t_end = 0
        self.updates = 0  # topology updates in the current task
        self._update_due = False
        self._guard: FrozenGuard | None = None
        self._saved: dict[str, torch.Tensor] | None = None
        self._view: int | None = None
        # Task 0's mask exists before training, so the random-init reference of forward transfer
        # is the sparse random network of density 1 - sparsity, not an all-zero backbone.
        self.masks = MaskSet(model, {n: torch.zeros_like(params[n], dtype=torch.bool) for n in names})
        self._draw_mask(0)

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def _draw_mask(self, task: int) -> None:
        """Choose ``M_task`` among free weights, give it the initial values, zero every other free weight."""
        params = dict(self.model.named_parameters())
        current = trainable_among_free(self.ownership, self.counts)
        self.saturated = []
        for n in self.names:
            owned = self.ownership.owned(n)
            m = current[n]
            p = params[n]
            p.copy_(torch.where(m, self.init_values[n], p * owned))
            self.masks.set_mask(n, owned | m)
            if int(m.sum()) < self.counts[n]:
                self.saturated.append(n)
        self.current, self.current_task = current, task

    def growth_mode(self, task: int) -> str:
        """Growth mode used in ``task`` (the adaptive schedule's entry, or the fixed mode)."""
        return self.growth[task]

    def _task_steps(self, task: Task) -> int:
        n = len(self.train_split(task))
        if self.opt.train_samples:
            n = min(n, self.opt.train_samples)
        return math.ceil(n / self.ctx.batch_size) * self.ctx.epochs

    def _frozen(self, task: int) -> dict[str, torch.Tensor]:
        frozen = self.ownership.frozen_masks(task)
        params = dict(self.model.named_parameters())
        for t in range(task):
            for n in self.head_params[t]:
                frozen[n] = torch.ones_like(params[n], dtype=torch.bool)
        return frozen

    def _set_grad_masks(self) -> None:
        """Gradients reach ``M_t`` only (plus the free weights for momentum growth's dense moment)."""
        if self.growth_mode(self.current_task) != "momentum":
            for n in self.names:
                self.masks.set_grad_mask(n, self.current[n], push=False)
            self.masks.push_flops()
            return
        # Momentum growth: no gradient mask (a gradient mask never covers inactive weights), so the
        # free weights get Adam moments; the guard zeroes frozen gradients, the weight mask puts
        # the free weights back to 0 after each step. FLOPs: weight gradients of M_t + free weights.
        self.masks.clear_grad_masks()
        flops = self.ctx.flops
        if flops is not None:
            known = {p.weight for p in flops.layers}
            for n in self.names:
                if n in known:
                    g = int((self.current[n] | self.ownership.free(n)).sum()) / self.masks.numel(n)
                    flops.set_density(n, self.masks.density(n), g)

    # ------------------------------------------------------------------ training
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if self.current_task != task.index:
            self._draw_mask(task.index)
        if self.ctx.flops is not None:
            self.masks.bind_flops(self.ctx.flops)
        self._set_grad_masks()
        self._guard = FrozenGuard(self.model, self._frozen(task.index))
        self._guard.hook_optimizer(self.optimizer)
        self.masks.hook_optimizer(self.optimizer)
        self.step, self.updates = 0, 0
        self.t_end = self._task_steps(task)

    def epoch_indices(self, task: Task, epoch: int) -> torch.Tensor | None:
        n = len(self.train_split(task))
        if not self.opt.train_samples or self.opt.train_samples >= n:
            return None
        return torch.randperm(n, device=self.device)[: self.opt.train_samples]

    def observe(self, batch: Batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(batch.x), batch.y, batch.task_id)
        loss.backward()
        t = self.step + 1
        due = t % self.opt.delta_t == 0 and t < self.t_end
        dense_grads = None
        if due and self.growth_mode(self.current_task) == "gradient":
            # The dense gradient of this step, before the optimiser hooks mask it.
            params = self.masks.params
            dense_grads = {n: params[n].grad.detach().clone() for n in self.names if params[n].grad is not None}
            flops = self.ctx.flops
            if flops is not None:  # this step computed the dense weight gradient: charge it
                known = {p.weight for p in flops.layers}
                for n in self.names:
                    if n in known:
                        flops.set_density(n, self.masks.density(n), 1.0)
        self.optimizer.step()
        self.step = t
        if due:
            self._topology_update(dense_grads)
        return loss.detach()

    @torch.no_grad()
    def _topology_update(self, dense_grads: dict[str, torch.Tensor] | None) -> None:
        frac = cosine_update_fraction(self.step, self.opt.drop_fraction, self.t_end)
        mode = self.growth_mode(self.current_task)
        for n in self.names:
            cur = self.current[n]
            n_cur = int(cur.sum())
            k = int(frac * n_cur)
            free = self.ownership.free(n)
            if mode == "unfired":
                allowed = free & ~self.masks.ever_active[n]  # never used by any task
                k = min(k, int(allowed.sum()))  # drop only what can be regrown: the count stays exact
            else:
                allowed = free
            if k <= 0:
                continue
            p = self.masks.params[n]
            # Frozen weights are never dropped: score +inf (k <= |M_t| smaller scores exist).
            score = p.detach().abs().masked_fill(~cur, float("inf"))
            grad = dense_grads.get(n) if dense_grads is not None else None
            before = self.masks.masks[n].clone()
            drop_and_grow_(self.masks, n, k, mode, drop_score=score, grad=grad, optimizer=self.optimizer,
                           allowed=allowed)
            after = self.masks.masks[n]
            cur.copy_((cur & after) | (after & ~before))  # kept current weights + grown ones
        self._set_grad_masks()
        self.updates += 1

    def end_epoch(self, task: Task, epoch: int) -> None:
        # Step-down schedule: lr * 0.1 per milestone reached by the next epoch (paper: 1/2, 3/4).
        e = epoch + 1
        if e >= self.ctx.epochs:
            return
        factor = 0.1 ** sum(e >= m * self.ctx.epochs for m in self.opt.milestones())
        for group in self.optimizer.param_groups:
            group["lr"] = self.opt.lr * factor

    def end_task(self, task: Task) -> None:
        t = task.index
        self._guard.unhook()
        self.masks.unhook()
        self.masks.clear_grad_masks()
        trained = {n: int(self.current[n].sum()) for n in self.names}
        self.ownership.assign_all_(self.current, t)
        self.current, self.current_task = None, -1
        self.snapshots.append({n: v.detach().clone() for n, v in self._shared_state().items()})
        usage = self.ownership.usage()
        self.history.append({
            "task": t + 1,
            "grow": self.growth_mode(t),
            "trained_weights": trained,
            "requested_weights": dict(self.counts),
            "saturated_layers": list(self.saturated),
            "topology_updates": self.updates,
            "usage": usage,
            "used_fraction": self.ownership.used_fraction(),
            "free_weights": {n: int(self.ownership.free(n).sum()) for n in self.names},
        })

    # ---------------------------------------------------------------- evaluation
    def _view_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self._model_tensors()
        return {n: tensors[n] for n in [*self.names, *self.shared_names]}

    @torch.no_grad()
    def _use_task(self, j: int) -> None:
        """Weights of tasks <= j (and the mask in training if j is its task or later), task j's shared tensors."""
        state = self._model_tensors()
        for n in self.names:
            keep = self.ownership.owned(n, upto=j)
            if self.current is not None and j >= self.current_task:
                keep = keep | self.current[n]
            state[n].copy_(self._saved[n] * keep)
        if self.opt.per_task_bn:
            shared = self.snapshots[j] if j < len(self.snapshots) else self._saved
            for n in self.shared_names:
                state[n].copy_(shared[n])
        self._view = j

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        """Backbone usage after each task (fraction of each isolated layer and of all owned)."""
        return {
            "init": self.opt.init,
            "sparsity": self.opt.sparsity,
            "grow_schedule": list(self.growth),
            "per_task_bn": self.opt.per_task_bn,
            "tasks": self.history,
            # First task that got fewer weights than requested in some layer (backbone saturated).
            "saturated_at_task": next((h["task"] for h in self.history if h["saturated_layers"]), None),
            # First task after which some isolated layer had no free weight left.
            "layer_full_after_task": next((h["task"] for h in self.history
                                           if min(h["free_weights"].values(), default=1) == 0), None),
        }

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"ownership": self.ownership.state_dict(), "masks": self.masks.state_dict(),
                "snapshots": self.snapshots, "init_values": self.init_values, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.ownership.load_state_dict(state["ownership"])
        self.masks.load_state_dict(state["masks"])
        self.snapshots = [{n: v.to(self.device) for n, v in s.items()} for s in state["snapshots"]]
        self.init_values = {n: v.to(self.device) for n, v in state["init_values"].items()}
        self.history = list(state["history"])
        self.current, self.current_task = None, -1  # the next task draws its mask in begin_task
