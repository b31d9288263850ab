"""RigL-DER++ (``rigl-der++``): DER++ with RigL's dynamic sparse topology (Evci et al., ICML 2020).

- Initial mask: random with exact per-layer counts, ``uniform`` (default; SparCL's protocol) or
  ``erk`` allocation, applied at construction (so the random-init reference is sparse too).
- Every ``delta_t`` optimiser steps while ``t < T_end``: in each masked layer drop the
  ``floor(f(t) * active)`` active weights of smallest ``|w|`` and grow as many inactive weights
  with the largest ``|dense gradient|`` (the gradient of that step's DER++ loss), with
  ``f(t) = drop_fraction / 2 * (1 + cos(pi * t / T_end))`` (defaults ``delta_t`` 100,
  ``drop_fraction`` 0.3, ``T_end`` = 0.75 of the steps: RigL's). Grown weights start at zero with
  zero optimiser state; a weight dropped in an update may be regrown in it (then restarting at 0).
- ``schedule``: ``run`` (default) runs one cosine schedule over all tasks' steps, as plain RigL
  would on the concatenated stream (no task awareness, SparCL's point); ``task`` restarts it at
  every task with ``T_end`` a fraction of that task's steps.
- ``grow``: ``gradient`` is RigL; ``random`` (SET), ``unfired`` and ``momentum`` (SNFS) are the
  other growth modes of :mod:`sparsecl.sparse.growth`.

The update runs after the optimiser step of every ``delta_t``-th step (the step's weights are
already masked), from the dense gradient that backward computed. FLOPs: update steps are charged
a dense weight-gradient pass for the masked layers (RigL's own accounting); other steps run at
the mask's density.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import Batch, register_method
from sparsecl.methods.sparse_derpp import SparseDERpp, SparseDERppOptions
from sparsecl.sparse.growth import GROWTH_MODES, cosine_update_fraction, drop_and_grow_
from sparsecl.sparse.masks import MaskSet

SCHEDULES = ("run", "task")


@dataclass
class RigLDERppOptions(SparseDERppOptions):
    delta_t: int = 100  # optimiser steps between topology updates
    drop_fraction: float = 0.3  # RigL's alpha: fraction of active weights updated at t = 0
    t_end: float = 0.75  # fraction of the schedule's steps after which the mask is fixed
    schedule: str = "run"  # run (one schedule over all tasks) | task (restart per task)
    grow: str = "gradient"  # gradient (RigL) | random (SET) | unfired | momentum (SNFS)

    def validate(self) -> None:
        super().validate()
        if self.delta_t < 1:
            raise SparseCLError(f"delta_t must be >= 1, got {self.delta_t}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise SparseCLError(f"drop_fraction must lie in [0, 1], got {self.drop_fraction}")
        if not 0.0 <= self.t_end <= 1.0:
            raise SparseCLError(f"t_end must lie in [0, 1] (a fraction of the steps), got {self.t_end}")
        if self.schedule not in SCHEDULES:
            raise SparseCLError(f"unknown schedule {self.schedule!r} (known: {', '.join(SCHEDULES)})")
        if self.grow not in GROWTH_MODES:
            raise SparseCLError(f"unknown growth mode {self.grow!r} (known: {', '.join(GROWTH_MODES)})")
        if self.grow == "momentum" and self.optimizer == "sgd" and self.momentum == 0:
            raise SparseCLError("grow=momentum needs an optimiser with momentum (-o momentum=0.9 or -o optimizer=adam)")


@register_method
class RigLDERpp(SparseDERpp, distributed=True):
    """DER++ with RigL drop (magnitude) / grow (dense gradient) updates on a cosine schedule."""

    name = "rigl-der++"
    description = "RigL-DER++: DER++ with RigL dynamic sparsity (drop |w|, grow |grad|, cosine schedule)"
    options_cls = RigLDERppOptions
    # distributed: updates use the rank-averaged gradient; masks broadcast after each

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self.t = 0  # optimiser steps in the current schedule
        self.updates = 0  # topology updates done (whole run)
        # Per task: topology updates and weights regrown (drop = grow), for report().
        self.history: list[dict[str, int]] = []
        self._hook = None
        self._update_due = False
        self.install_masks(MaskSet.from_counts(model, self.layer_counts()))

    # ------------------------------------------------------------------ schedule
    def _task_steps(self, task: Task) -> int:
        return math.ceil(len(self.train_split(task)) / self.ctx.batch_size) * self.ctx.epochs

    def schedule_steps(self) -> int:
        """Steps of the current schedule: the whole run, or the current task."""
        if self.options.schedule == "task":
            return self._task_steps(self.ctx.stream.tasks[self.task])
        return sum(self._task_steps(t) for t in self.ctx.stream.tasks)

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        if self.options.schedule == "task":
            self.t = 0
        self.t_end = int(self.options.t_end * self.schedule_steps())
        self.history.append({"task": task.index + 1, "updates": 0, "regrown": 0})

    def make_optimizer(self, params=None) -> torch.optim.Optimizer:
        optimizer = super().make_optimizer(params)
        if self._hook is not None:
            self._hook.remove()
        # Registered after the mask hooks, so it runs after the weights were masked.
        self._hook = optimizer.register_step_post_hook(lambda *_: self._after_step())
        return optimizer

    def _next_is_update(self) -> bool:
        t = self.t + 1
        return t % self.options.delta_t == 0 and t < self.t_end

    # ------------------------------------------------------------------ training
    def observe(self, batch: Batch) -> torch.Tensor:
        self._update_due = self._next_is_update()
        if self._update_due:  # this step needs the dense weight gradient of the masked layers: charge it
            self.masks.push_flops(dense_grad=True)
        return super().observe(batch)

    def _after_step(self) -> None:
        self.t += 1
        if not self._update_due:
            return
        self._update_due = False
        frac = cosine_update_fraction(self.t, self.options.drop_fraction, self.t_end)
        regrown = 0
        for n in self.mask_names:
            k = int(frac * self.masks.active(n))
            if k > 0:
                drop_and_grow_(self.masks, n, k, self.options.grow, optimizer=self.optimizer)
                regrown += k
        self.sync_masks()
        self.masks.push_flops()  # back to the mask's densities (also when nothing changed)
        self.updates += 1
        if self.history:
            self.history[-1]["updates"] += 1
            self.history[-1]["regrown"] += regrown

    def report(self) -> dict:
        """Schedule and, per task, the topology updates and the weights they regrew."""
        return {"schedule": self.options.schedule, "grow": self.options.grow, "delta_t": self.options.delta_t,
                "drop_fraction": self.options.drop_fraction, "t_end_steps": self.t_end, "updates": self.updates,
                "masked_weights": sum(self.masks.numel(n) for n in self.mask_names), "tasks": self.history}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["rigl"] = {"t": self.t, "updates": self.updates, "history": self.history}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.t = int(state["rigl"]["t"])
        self.updates = int(state["rigl"]["updates"])
        self.history = [dict(h) for h in state["rigl"].get("history", [])]
