"""Per-task weight ownership for parameter isolation (continual DST, PackNet; SPEC).

:class:`TaskOwnership` records, for every weight of some parameters, which task owns it
(``-1`` = free). After a task its trained weights are assigned to it and frozen.

:class:`FrozenGuard` keeps frozen weights bit-identical through any optimiser: zeroing their
gradients is not enough (SGD weight decay and momentum, Adam's moments and AdamW's decoupled
decay all move a weight whose gradient is zero), so the guard also snapshots the frozen values
and writes them back after every step (``torch.where``, no host synchronisation)::

    guard = FrozenGuard(model, ownership.frozen_masks(task))
    guard.hook_optimizer(optimizer)       # or call before_step()/after_step() around step()
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.sparse.masks import bitmask_bytes

FREE = -1


class TaskOwnership:
    """Which task owns each weight of the given parameters (``int16``, ``-1`` = free).

    Args:
        model: the model; ownership tensors live on each parameter's device.
        names: the parameters under isolation (e.g. from :class:`~sparsecl.sparse.policy.MaskPolicy`).
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        params = dict(model.named_parameters())
        self.names = list(names)
        self.owner: dict[str, torch.Tensor] = {
            n: torch.full(params[n].shape, FREE, dtype=torch.int16, device=params[n].device) for n in self.names
        }
        self.n_tasks = 0  # tasks that have been assigned weights (highest task index + 1)

    def free(self, name: str) -> torch.Tensor:
        """Bool mask of the weights of ``name`` that no task owns."""
        return self.owner[name] == FREE

    def owned(self, name: str, task: int | None = None, *, upto: int | None = None) -> torch.Tensor:
        """Weights owned by ``task`` exactly, by any task ``<= upto``, or (neither given) by any task."""
        o = self.owner[name]
        if task is not None:
            return o == task
        if upto is not None:
            return (o != FREE) & (o <= upto)
        return o != FREE

    def frozen_masks(self, task: int) -> dict[str, torch.Tensor]:
        """Weights owned by tasks other than ``task``: the ones a guard must keep unchanged while training it."""
        return {n: (o != FREE) & (o != task) for n, o in self.owner.items()}

    def assign_(self, name: str, mask: torch.Tensor, task: int) -> None:
        """Give the weights of ``mask`` to ``task``; weights owned by another task may not be taken."""
        o = self.owner[name]
        mask = mask.to(o.device, torch.bool)
        if bool((mask & (o != FREE) & (o != task)).any()):
            raise SparseCLError(f"task {task} cannot take weights of {name} owned by another task")
        o.masked_fill_(mask, int(task))
        self.n_tasks = max(self.n_tasks, int(task) + 1)

    def assign_all_(self, masks: Mapping[str, torch.Tensor], task: int) -> None:
        """:meth:`assign_` for every parameter in ``masks``."""
        for n, m in masks.items():
            self.assign_(n, m, task)

    def usage(self) -> dict[str, float]:
        """Fraction of each parameter owned by some task (one host sync per parameter)."""
        return {n: float((o != FREE).float().mean()) for n, o in self.owner.items()}

    def n_used(self) -> int:
        """Number of weights under isolation that some task owns."""
        return sum(int((o != FREE).sum()) for o in self.owner.values())

    def used_fraction(self) -> float:
        """Fraction of all weights under isolation that some task owns (the capacity used)."""
        total = sum(o.numel() for o in self.owner.values())
        return self.n_used() / total if total else 0.0

    def task_mask_bytes(self) -> int:
        """Bytes to store one packed bitmask per task and parameter (what per-task masks cost)."""
        return self.n_tasks * sum(bitmask_bytes(o.numel()) for o in self.owner.values())

    def state_dict(self) -> dict[str, Any]:
        return {"owner": dict(self.owner), "n_tasks": self.n_tasks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["owner"]) != self.names:
            raise ValueError("ownership state was saved for a different set of parameters")
        self.owner = {n: t.to(self.owner[n].device, torch.int16) for n, t in state["owner"].items()}
        self.n_tasks = int(state["n_tasks"])


class FrozenGuard:
    """Keeps the frozen weights of some parameters bit-identical through optimiser steps.

    Args:
        model: the model.
        frozen: parameter name -> bool mask of frozen weights (e.g. ``ownership.frozen_masks(t)``).
        snapshot: take the frozen values now (else call :meth:`snapshot` before training).
        values: the values to keep, per parameter, where they are not the parameter's current ones
            (e.g. a backbone store holding weights the live parameter has masked out); the
            guard reads these tensors, it does not copy them. Parameters not in ``values`` are
            snapshotted.
    """

    def __init__(self, model: nn.Module, frozen: Mapping[str, torch.Tensor], *, snapshot: bool = True,
                 values: Mapping[str, torch.Tensor] | None = None) -> None:
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in frozen}
        self.frozen = {n: m.to(params[n].device, torch.bool) for n, m in frozen.items()}
        self.saved: dict[str, torch.Tensor] = {}
        self._values = dict(values or {})
        self._hooks: list[Any] = []
        if snapshot:
            self.snapshot()

    def set_frozen_(self, name: str, mask: torch.Tensor) -> None:
        """Change which weights of ``name`` are frozen (e.g. after a topology update)."""
        self.frozen[name].copy_(mask)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the current values of the frozen weights (those given as ``values`` are read live)."""
        self.saved = {n: self._values[n] if n in self._values else p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero the gradients of frozen weights (keeps optimiser state clean of them)."""
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.masked_fill_(self.frozen[n], 0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the snapshot back into the frozen positions (exact bits)."""
        for n, p in self.params.items():
            p.copy_(torch.where(self.frozen[n], self.saved[n], p))

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Run :meth:`before_step` / :meth:`after_step` around every ``optimizer.step()``."""
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.before_step()))
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.after_step()))

    def unhook(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
