"""NISPA (``nispa``, Gurbuz & Dovrolis, "NISPA: Neuro-Inspired Stability-Plasticity Adaptation for
Continual Learning in Sparse Networks", ICML 2022): a fixed-budget sparse network whose units are
*stable* (they serve earlier tasks, their incoming connections frozen) or *plastic*; Task-IL
(per-task heads) and Class-IL (one head), as the paper's code (``--multihead``).

The network is sparse from the start: every linear layer of the MLP backbone and the head keeps
a random ``density`` of its weights (:class:`~sparsecl.sparse.masks.MaskSet`, exact counts per
layer); the number of active connections never changes. Per task, NISPA trains in *phases* of
``phase_epochs`` epochs (the engine's epochs are the first phase, the later ones run here). After
phase ``k`` it

1. picks stable-candidate units per hidden layer: the most active units (mean post-ReLU activation
   over the task's training data) until their share of the layer's total activation reaches
   ``a_f = 0.5 (1 + cos(k pi / step_k))`` (the paper's cosine schedule, ``--p_step_size cosine``);
   the outputs of the classes seen so far are stable too;
2. drops every connection from a plastic unit into a stable one (so a stable unit's output depends
   on stable units only), and
3. grows as many connections per layer as it dropped, uniformly at random among the inactive
   positions whose target is a plastic unit (``full_random``), initialised from a normal with the
   layer's active weights' mean and std (``grow_init: normal``).

A phase whose validation accuracy falls more than ``recovery_perc`` points below the best phase
so far (after the second phase), or ``a_f <= 5 %``, ends the task: the model rolls back to the
last phase before it (weights and connectivity) and its candidates become stable for good. The
connections between stable units (and stable units' biases) are then frozen bit-exactly
(:class:`~sparsecl.sparse.ownership.FrozenGuard`) and every other weight is re-initialised
(``reinit``, kaiming normal fan-out, biases 0). The frozen paths are the whole computation of
earlier tasks' outputs, so their accuracy is exactly kept; one model serves every task.

Choices taken from the official code (github.com/BurakGurbuz97/NISPA) where the paper leaves them
open: Adam with the optimiser re-created every phase; the validation split is 10 % of each task's
training data (``split_train_val(val_split=0.1)``); in Class-IL the logits of classes outside the
current task are multiplied by 0 in training (``mask_outputs``), not removed; candidates are picked
among all units of a layer (already stable ones included) and joined to the stable set.
Differences: the official phase keeps its best epoch by validation accuracy, here a phase keeps its
last epoch; the masks have an exact number of active weights per layer (the official draws each
weight with probability ``density``); the official code's repair of plastic units without outgoing
connections (``fix_no_outgoing``) is not done. Only the MLP backbone is supported (the official
code's conv networks are plain chains too; ours are not).

A layer that has no inactive position with a plastic target left cannot regrow what it dropped
(the output layer in the last task: every class is stable); those connections are lost, as in the
official code, and reported (``unplaced``).

Report: per task the number of phases, ``a_f`` of the kept phase, the stable units per layer, the
fraction of active connections frozen and ``unplaced``; capacity counts one shared mask.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import CLASS_IL, TASK_IL, ContinualMethod, MethodOptions, register_method
from sparsecl.methods.masked import MaskedTraining, MaskOptions
from sparsecl.methods.phases import restore_, run_epochs, snapshot, split_accuracy
from sparsecl.methods.scratch import TaskValidation
from sparsecl.sparse.masks import MaskSet
from sparsecl.sparse.ownership import FrozenGuard
from sparsecl.sparse.units import UnitChain

SCHEDULES = ("cosine", "linear", "exp_decay")
GROW_INITS = ("normal", "zero")


@dataclass
class NISPAOptions(MaskOptions, MethodOptions):
    lr: float = 0.01
    optimizer: str = "adam"
    sparsity: float = 0.8  # 1 - density of every layer (the official --prune_perc 80 / 100)
    include_head: bool = True  # the output layer is sparse too
    phase_epochs: int = 5  # epochs of every later phase (the first phase is the run's epochs)
    recovery_perc: float = 0.75  # accuracy drop (points) that ends the task
    schedule: str = "cosine"  # a_f(k): cosine 0.5(1+cos(k pi/step_k)) | linear 1-step_k*k | exp_decay (k+1)^-step_k
    step_k: float = 30.0
    min_stable_perc: float = 5.0  # a_f (percent) at or below which the task ends
    max_phases: int = 0  # 0 = no cap besides the two stopping rules
    grow_init: str = "normal"
    reinit: bool = True
    val_fraction: float = 0.1

    def validate(self) -> None:
        super().validate()
        self.validate_masks()
        if self.policy != "conv-linear" or not self.include_head:
            raise SparseCLError("nispa masks every linear layer and the head (policy conv-linear, include_head true)")
        if self.phase_epochs < 1 or self.max_phases < 0 or self.recovery_perc < 0:
            raise SparseCLError("nispa needs phase_epochs >= 1, max_phases >= 0 and recovery_perc >= 0")
        if self.schedule not in SCHEDULES:
            raise SparseCLError(f"unknown schedule {self.schedule!r} (known: {', '.join(SCHEDULES)})")
        if self.grow_init not in GROW_INITS:
            raise SparseCLError(f"unknown grow_init {self.grow_init!r} (known: {', '.join(GROW_INITS)})")
        if not 0 < self.val_fraction < 1 or not self.step_k > 0:
            raise SparseCLError("nispa needs val_fraction in (0, 1) and step_k > 0")

    def stable_perc(self, k: int) -> float:
        """``a_f`` of phase ``k`` (1-based), in percent."""
        if self.schedule == "cosine":
            return 50.0 * (1 + math.cos(k * math.pi / self.step_k))
        if self.schedule == "linear":
            return 100.0 * (1 - self.step_k * k)
        return 100.0 * (k + 1) ** (-self.step_k)


def top_share(act: torch.Tensor, perc: float) -> torch.Tensor:
    """Bool mask of the most active units whose summed activation first reaches ``perc`` % of the total."""
    order = torch.argsort(act, descending=True, stable=True)
    cum = torch.cumsum(act[order], 0)
    k = int((cum < cum[-1] * perc / 100).sum()) + 1  # the unit that crosses the share is included
    out = torch.zeros_like(act, dtype=torch.bool)
    out[order[:min(k, act.numel())]] = True
    return out


@register_method
class NISPA(TaskValidation, MaskedTraining, ContinualMethod, sparse_kernels=False):
    """Sparse network with stable/plastic units, connection rewiring and frozen stable paths."""

    name = "nispa"
    description = "NISPA: fixed-budget sparse MLP, stable/plastic units, plastic->stable connections rewired"
    options_cls = NISPAOptions
    settings = frozenset({TASK_IL, CLASS_IL})
    # sparse_kernels=False: its masks change between phases inside end_task, outside the steps the
    # kernels were tested on.

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self.chain = UnitChain(model, who="nispa")
        self.params = dict(model.named_parameters())
        # Stable hidden units (committed at the end of each task) and the candidates in force now.
        self.stable = [torch.zeros(w, dtype=torch.bool, device=self.device) for w in self.chain.width]
        self.cand = [s.clone() for s in self.stable]
        self.guard: FrozenGuard | None = None
        self.stats: dict[str, list[Any]] = {"phases": [], "stable_perc": [], "stable_units": [], "frozen_fraction": [],
                                            "unplaced": []}
        self.budget = 0  # active connections of the initial masks

    # ------------------------------------------------------------------ masks
    def create_masks(self, task: Task) -> MaskSet:
        counts = self.layer_counts()
        self.budget = sum(counts.values())
        return MaskSet.from_counts(self.model, counts)

    def _layers(self) -> list[list[str]]:
        """Weight names per layer, the heads together as the last layer."""
        return [[n] for n in self.chain.names] + [self.chain.head_names]

    def _targets(self, units: list[torch.Tensor], name: str, upto: int) -> torch.Tensor:
        """Stable target units (rows) of weight ``name``: hidden ones from ``units``, outputs of
        the classes (heads) of tasks ``<= upto``."""
        if name in self.chain.names:
            return units[self.chain.names.index(name)]
        if self.chain.multi_head:
            t = self.chain.head_names.index(name)
            return torch.full((self.params[name].shape[0],), t <= upto, device=self.device)
        return self.class_task <= upto

    def _sources(self, units: list[torch.Tensor], name: str) -> torch.Tensor:
        """Stable source units (columns) of weight ``name`` (the inputs are always stable)."""
        if name in self.chain.names:
            i = self.chain.names.index(name)
            return units[i - 1] if i else torch.ones(self.chain.n_inputs, dtype=torch.bool, device=self.device)
        return units[-1]

    def frozen_masks(self, upto: int) -> dict[str, torch.Tensor]:
        """Connections between stable units (outputs of tasks ``<= upto``) and those units' biases."""
        frozen: dict[str, torch.Tensor] = {}
        for group in self._layers():
            for n in group:
                tgt = self._targets(self.stable, n, upto)
                frozen[n] = tgt[:, None] & self._sources(self.stable, n)[None, :]
                frozen[n[: -len("weight")] + "bias"] = tgt
        return frozen

    # ------------------------------------------------------------------ training
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.cand = [s.clone() for s in self.stable]
        self.guard = FrozenGuard(self.model, self.frozen_masks(task.index - 1)) if task.index else None
        self._hook_guard()

    def make_optimizer(self, params: Any = None) -> torch.optim.Optimizer:
        optimizer = super().make_optimizer(params)
        self.optimizer = optimizer
        self._hook_guard()
        return optimizer

    def _hook_guard(self) -> None:
        if getattr(self, "guard", None) is not None and self.optimizer is not None:
            self.guard.unhook()
            self.guard.hook_optimizer(self.optimizer)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        if self.ctx.setting == TASK_IL:
            return super().loss(logits, y, task_ids)
        # Class-IL: the official mask_outputs multiplies other classes' logits by 0.
        return F.cross_entropy(logits * self._task_class_mask[task_ids], y)

    def _val_accuracy(self, task: Task) -> float:
        if self.ctx.setting == TASK_IL:
            classes = torch.as_tensor(task.classes, device=self.device)
        else:
            classes = torch.nonzero(self.class_task <= task.index).flatten()
        return split_accuracy(self, self.held_out(task)[1], classes)

    def end_task(self, task: Task) -> None:
        o, train = self.options, self.held_out(task)[0]
        best, kept, k = 0.0, None, 0
        while True:
            k += 1
            if k > 1:
                self.optimizer = self.make_optimizer()
                run_epochs(self, train, task.index, o.phase_epochs)
            acc, perc = self._val_accuracy(task), o.stable_perc(k)
            stop = (acc < best - o.recovery_perc and k > 2) or perc <= o.min_stable_perc
            if stop:
                break
            best = max(acc, best)
            kept = (self._snapshot(), [c.clone() for c in self.cand], k, perc)
            if o.max_phases and k >= o.max_phases:
                break
            self._rewire(train, perc)
        state, cand, phases, perc = kept
        self._restore(state)
        self.stable = cand
        self.cand = [c.clone() for c in cand]
        frozen = self.frozen_masks(task.index)
        if o.reinit:
            self._reinitialise(frozen)
        self.stats["phases"].append(phases)
        self.stats["stable_perc"].append(round(perc, 4))
        self.stats["stable_units"].append([int(s.sum()) for s in self.stable])
        active = sum(int((self.masks.masks[n] & frozen[n]).sum()) for g in self._layers() for n in g)
        self.stats["frozen_fraction"].append(active / max(self.masks.active(), 1))
        # Dropped connections a layer had no plastic target left to regrow at (the official
        # code loses them too, e.g. in the output layer during the last task).
        self.stats["unplaced"].append(self.budget - self.masks.active())
        if self.guard is not None:
            self.guard.unhook()
        self.guard = None

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return snapshot(self.params, self.masks)

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        restore_(state, self.params, self.masks)

    @torch.no_grad()
    def _rewire(self, train, perc: float) -> None:
        """New stable candidates at share ``perc``; drop plastic->stable connections; regrow as many."""
        acts = self.chain.mean_activations(self.model, self.ctx.augment.eval(train.x))
        self.cand = [s | top_share(a, perc) for s, a in zip(self.stable, acts)]  # committed + this phase
        for group in self._layers():
            dropped = 0
            for n in group:
                m = self.masks.masks[n]
                drop = m & self._targets(self.cand, n, self.task)[:, None] & ~self._sources(self.cand, n)[None, :]
                dropped += int(drop.sum())
                self.masks.set_mask(n, m & ~drop)
            self._grow(group, dropped)
        self.masks.apply_()

    def _grow(self, group: list[str], k: int) -> None:
        """``k`` new connections, uniformly among the inactive positions with a plastic target."""
        free = [(~self.masks.masks[n] & ~self._targets(self.cand, n, self.task)[:, None]).flatten() for n in group]
        flat = torch.cat(free)
        pos = torch.nonzero(flat).flatten()
        pick = pos[torch.randperm(pos.numel(), device=self.device)[:k]]
        chosen = torch.zeros_like(flat)
        chosen[pick] = True
        start = 0
        for n, f in zip(group, free):
            new = chosen[start:start + f.numel()].view(self.params[n].shape)
            start += f.numel()
            w = self.params[n]
            if self.options.grow_init == "normal":
                live = w[self.masks.masks[n]]
                init = torch.empty_like(w).normal_(float(live.mean()), float(live.std())) if live.numel() > 1 else w
                w.copy_(torch.where(new, init, w))
            else:
                w.masked_fill_(new, 0.0)
            self.masks.set_mask(n, self.masks.masks[n] | new)

    @torch.no_grad()
    def _reinitialise(self, frozen: dict[str, torch.Tensor]) -> None:
        """Every weight and bias outside the frozen stable paths starts afresh (official ``reinit``)."""
        for group in self._layers():
            for n in group:
                w, b = self.params[n], n[: -len("weight")] + "bias"
                fresh = torch.nn.init.kaiming_normal_(torch.empty_like(w), mode="fan_out", nonlinearity="relu")
                w.copy_(torch.where(frozen[n], w, fresh))
                self.params[b].masked_fill_(~frozen[b], 0.0)
        self.masks.apply_()

    # ------------------------------------------------------------------ reporting, checkpoints
    def report(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.stats.items()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["stable"] = [s.clone() for s in self.stable]
        state["budget"] = self.budget
        state["stats"] = copy.deepcopy(self.stats)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stable = [s.to(self.device) for s in state["stable"]]
        self.budget = int(state["budget"])
        self.stats = copy.deepcopy(state["stats"])
