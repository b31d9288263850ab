"""DEN (``den``, Yoon, Yang, Lee & Hwang, "Lifelong Learning with Dynamically Expandable Networks",
ICLR 2018): selective retraining, dynamic expansion when the loss threshold is not met, and
split/duplication of units that drifted; Task-IL with a head per task.

Every step minimises the task's cross-entropy plus ``l2_lambda * ||W||^2 / 2`` over the weights it
trains and, for weights that existed before the task, ``regular_lambda * ||W - W_prev||^2 / 2``
(drift towards the previous task's values; both terms on the hidden units' biases too), then applies the L1 proximal step (``|w| <
l1_lambda`` -> 0, else shrink by ``l1_lambda``) to the weights it trains, as the official code.

Task 1: the whole base network and its head train for the run's ``E`` epochs.

Task t > 1 (``E`` epochs per stage):

1. **selective retraining**: the new head alone trains for ``select_epochs`` (with L1, so its
   connections to the last hidden layer become sparse); from the units it connects to, a
   breadth-first search down the network selects every unit with a nonzero connection into the
   selection above (all inputs at the bottom); then only the weights among selected units train
   (the engine's ``E`` epochs).
2. **dynamic expansion**, only if the training loss of that stage's last epoch is not below
   ``loss_thr``: ``ex_k`` new units per hidden layer are opened (fresh weights) and the whole
   network trains ``E`` epochs, with a group-lasso proximal step (``gl_lambda``) on each new unit's
   incoming weights; new units whose incoming weights all reached zero are removed again.
3. **split and duplication** (after an expansion, as in the official code): a hidden unit whose
   incoming weights drifted by more than ``spl_thr`` (L2 distance to their value before the task)
   is duplicated: the copy (a new unit of task t) takes the drifted weights and the unit's outgoing
   connections, the original gets its old incoming weights back; at most ``ex_k`` per layer (the
   official code takes those with the *smallest* drift above the threshold); then ``E`` more
   epochs of training.

Units carry the task that added them (the timestamp); task j is evaluated with the units of tasks
<= j only and its own head (``_use_task``), with the current values of the shared weights: DEN's
selective retraining and the drift penalty limit, but do not forbid, changes of earlier tasks'
weights, so its Task-IL BWT is measured, not zero.

Growth needs room in the allocated tensors: the MLP is built wider (``backbone_options: hidden``)
than the base network of ``base_units`` per hidden layer (the official MNIST network 312-128 grows
from there); model size is reported relative to the base network (``size_total``: open network /
base, as CL-LSG's tables). Only the MLP backbone is supported (the official code is an MLP too).

Choices of the official code (github.com/jaehong31/DEN) where the paper is open: Adam at ``lr``
(0.001), the thresholds above, the loss of the decision is the training loss. Differences: the
official head-only stage runs a tenth of its iterations, here ``select_epochs``; its learning
rate decays by 0.95 per epoch, here it is constant; group lasso is applied to new units' incoming
weights only (the official also to their outgoing ones); a split copy keeps the original's
outgoing weights in every later task's layer (the official rebuilds the layer).

Report, per task: ``expanded`` (the loss threshold was not met), ``select_loss``, ``added`` (new
units kept per layer), ``split`` (the indices of the units split, per layer), ``size_total``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import (TASK_IL, Batch, ContinualMethod, MethodOptions, TaskSubnetworks, register_method,
                                   task_heads)
from sparsecl.methods.phases import run_epochs
from sparsecl.sparse.masks import MaskSet
from sparsecl.sparse.units import UnitChain


@dataclass
class DENOptions(MethodOptions):
    lr: float = 0.001
    optimizer: str = "adam"
    l1_lambda: float = 1e-5
    l2_lambda: float = 1e-4
    gl_lambda: float = 1e-3
    regular_lambda: float = 0.5
    ex_k: int = 10
    loss_thr: float = 0.01
    spl_thr: float = 0.05
    base_units: int | None = None  # hidden units per layer of the first network; None = all allocated
    select_epochs: int = 1

    def validate(self) -> None:
        super().validate()
        if min(self.l1_lambda, self.l2_lambda, self.gl_lambda, self.regular_lambda, self.loss_thr, self.spl_thr) < 0:
            raise SparseCLError("den's lambdas and thresholds must be >= 0")
        if self.ex_k < 0 or self.select_epochs < 1 or (self.base_units is not None and self.base_units < 1):
            raise SparseCLError("den needs ex_k >= 0, select_epochs >= 1 and base_units >= 1")


@register_method
class DEN(TaskSubnetworks, ContinualMethod):
    """Dynamically expandable network: selective retraining, expansion, split/duplication (Task-IL)."""

    name = "den"
    description = "DEN: selective retraining, expansion below a loss threshold, split of drifting units (Task-IL)"
    options_cls = DENOptions
    settings = frozenset({TASK_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        task_heads(model, self.name)
        self.chain = UnitChain(model, options.base_units, who="den")
        self.base = options.base_units or self.chain.width[0]
        self.params = dict(model.named_parameters())
        self.weights = self.chain.names + self.chain.head_names
        self.init_values = {n: self.params[n].detach().clone() for n in self.weights}
        self.masks = MaskSet(model, self.chain.structure(), mask_grads=True)
        self.masks.apply_()
        self.done = 0  # finished tasks
        self.prev: dict[str, torch.Tensor] = {}
        self.old: dict[str, torch.Tensor] = {}
        self.new_units: list[torch.Tensor] = []  # bool per level: opened by this task's expansion
        self._loss, self._seen = torch.zeros((), device=ctx.device), 0
        self.stats: dict[str, list[Any]] = {k: [] for k in ("expanded", "select_loss", "added", "split", "size_total")}
        self._saved: dict[str, torch.Tensor] | None = None
        self._view: int | None = None

    # ------------------------------------------------------------------ stages
    def _train_only(self, allowed: dict[str, torch.Tensor]) -> None:
        """New optimiser; gradients only at ``allowed`` (default nothing) and the task's head."""
        head = self.chain.head_names[self.task]
        for n in self.weights:
            grad = allowed.get(n)
            if n == head:
                grad = torch.ones_like(self.masks.masks[n])
            self.masks.set_grad_mask(n, grad if grad is not None else torch.zeros_like(self.masks.masks[n]))
        self.masks.unhook()
        self.optimizer = self.make_optimizer()
        self.masks.hook_optimizer(self.optimizer)

    def begin_task(self, task: Task) -> None:
        self.task = t = task.index
        self.masks.bind_flops(self.ctx.flops)
        self.prev = {n: self.params[n].detach().clone() for n in self.chain.names + self.chain.bias_names}
        self.old = {n: self.masks.masks[n].clone() for n in self.chain.names}
        self.old.update({b: self.chain.open(i) for i, b in enumerate(self.chain.bias_names)})
        self.new_units = [torch.zeros_like(s, dtype=torch.bool) for s in self.chain.stamp]
        self._loss, self._seen = torch.zeros((), device=self.device), 0
        if t == 0:
            self._train_only({n: self.masks.masks[n] for n in self.chain.names})
            return
        self._train_only({})
        run_epochs(self, self.train_split(task), t, self.options.select_epochs)
        self._train_only(self._selection())
        self._loss, self._seen = torch.zeros((), device=self.device), 0

    @torch.no_grad()
    def _selection(self) -> dict[str, torch.Tensor]:
        """Weights among the units reachable from the new head through nonzero connections."""
        top = self.params[self.chain.head_names[self.task]]
        sel = [None] * len(self.chain.width)
        sel[-1] = (top != 0).any(0) & self.chain.open(len(sel) - 1)
        for i in range(len(sel) - 2, -1, -1):
            w = self.params[self.chain.names[i + 1]]
            sel[i] = (w[sel[i + 1]] != 0).any(0) & self.chain.open(i)
        out = {}
        for i, n in enumerate(self.chain.names):
            src = sel[i - 1] if i else torch.ones(self.chain.n_inputs, dtype=torch.bool, device=self.device)
            out[n] = sel[i][:, None] & src[None, :]
        return out

    def _trained(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, weight, where it trains)`` of every weight this stage trains."""
        for n in self.weights:
            g = self.masks.grad_masks.get(n)
            if g is not None:
                yield n, self.params[n], g

    def observe(self, batch: Batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        ce = self.loss(self.net(batch.x), batch.y, batch.task_id)
        reg = ce
        o = self.options
        for n, w, g in self._trained():
            reg = reg + o.l2_lambda * (w * g).square().sum() / 2
            if n in self.prev:
                reg = reg + o.regular_lambda * ((w - self.prev[n]) * (g & self.old[n])).square().sum() / 2
        for i, n in enumerate(self.chain.bias_names):  # hidden biases: the same two terms
            b, live = self.params[n], self.chain.open(i)
            reg = reg + o.l2_lambda * (b * live).square().sum() / 2
            reg = reg + o.regular_lambda * ((b - self.prev[n]) * self.old[n]).square().sum() / 2
        reg.backward()
        self.optimizer.step()
        self._proximal()
        self._loss = self._loss + ce.detach() * len(batch.y)
        self._seen += len(batch.y)
        return ce.detach()

    @torch.no_grad()
    def _proximal(self) -> None:
        """L1 shrinkage on the trained weights; group lasso on new units' incoming weights."""
        o = self.options
        for _, w, g in self._trained():
            shrunk = torch.sign(w) * (w.abs() - o.l1_lambda).clamp_min(0)
            w.copy_(torch.where(g, shrunk, w))
        for i, n in enumerate(self.chain.names):
            rows = self.new_units[i]
            if o.gl_lambda and bool(rows.any()):
                w = self.params[n]
                norm = w.norm(dim=1, keepdim=True)
                scale = (1 - o.gl_lambda / norm.clamp_min(1e-12)).clamp_min(0)
                w.copy_(torch.where(rows[:, None], w * scale, w))

    def end_epoch(self, task: Task, epoch: int) -> None:
        if epoch < self.ctx.epochs - 1:
            self._loss, self._seen = torch.zeros((), device=self.device), 0

    def end_task(self, task: Task) -> None:
        t, o = task.index, self.options
        expanded, added, split, loss = False, [0] * len(self.chain.width), [[] for _ in self.chain.width], None
        if t:
            loss = float(self._loss) / max(self._seen, 1)
            if loss >= o.loss_thr and o.ex_k:
                expanded = True
                added = self._expand(task)
                split = self._split(task)
        self.masks.clear_grad_masks()
        self.masks.unhook()
        self.done = t + 1
        st = self.stats
        st["expanded"].append(expanded)
        st["select_loss"].append(loss)
        st["added"].append(added)
        st["split"].append(split)
        st["size_total"].append(self.chain.backbone_weights() / self.chain.base_weights(self.base))

    def _expand(self, task: Task) -> list[int]:
        """Open ``ex_k`` units per layer, train everything, drop the new units left without input."""
        t, k = task.index, self.options.ex_k
        units = [self.chain.closed_units(i, k) for i in range(len(self.chain.width))]
        self.chain.grow_(units, t, self.masks, self.init_values)
        for i, u in enumerate(units):
            self.new_units[i][u] = True
        self._train_only({n: self.masks.masks[n].clone() for n in self.chain.names})
        run_epochs(self, self.train_split(task), t, self.ctx.epochs)
        added = []
        for i, n in enumerate(self.chain.names):
            dead = self.new_units[i] & (self.params[n] == 0).all(1)
            if bool(dead.any()):
                self.chain.shut_(i, torch.nonzero(dead).flatten(), self.masks)
            added.append(int((self.new_units[i] & ~dead).sum()))
        self.new_units = [torch.zeros_like(u) for u in self.new_units]
        return added

    @torch.no_grad()
    def _split(self, task: Task) -> list[list[int]]:
        """Duplicate drifted units (at most ``ex_k`` per layer), then train ``E`` epochs."""
        t, o = task.index, self.options
        split: list[list[int]] = []
        for i, n in enumerate(self.chain.names):
            w, prev, old = self.params[n], self.prev[n], self.old[n]
            existed = old.any(1)
            drift = ((w - prev) * old).norm(dim=1)
            over = torch.nonzero(existed & (drift > o.spl_thr)).flatten()
            picked = over[torch.argsort(drift[over])][: o.ex_k]
            free = self.chain.closed_units(i, picked.numel())
            picked = picked[: free.numel()]
            if picked.numel():
                self._duplicate(i, picked, free, t)
            split.append([int(u) for u in picked])
        with torch.enable_grad():
            self._train_only({n: self.masks.masks[n].clone() for n in self.chain.names})
            run_epochs(self, self.train_split(task), t, self.ctx.epochs)
        return split

    @torch.no_grad()
    def _duplicate(self, level: int, src: torch.Tensor, dst: torch.Tensor, t: int) -> None:
        """Units ``dst`` (closed) become copies of ``src`` with the drifted weights; ``src`` get their old ones back."""
        self.chain.open_(level, dst, t)
        n, b = self.chain.names[level], self.chain.bias_names[level]
        w = self.params[n]
        w[dst] = w[src]
        self.params[b][dst] = self.params[b][src]
        w[src] = self.prev[n][src]
        above = self.chain.names[level + 1:level + 2] or [self.chain.head_names[t]]
        for a in above:
            self.params[a][:, dst] = self.params[a][:, src]
        for m, s in self.chain.structure().items():  # later heads/layers may use the copies
            keep = s if m not in self.chain.head_names or self.chain.head_names.index(m) >= t else self.masks.masks[m]
            self.masks.set_mask(m, keep)
        self.masks.apply_()

    # ---------------------------------------------------------------- evaluation
    def _view_tensors(self) -> dict[str, torch.Tensor]:
        return {n: self.params[n] for n in self.chain.names}

    @torch.no_grad()
    def _use_task(self, j: int) -> None:
        """The units of tasks <= j with their current weights (a task not trained yet: the live network)."""
        done = j < self.done
        view = self.chain.structure(upto=j) if done else {}
        for n in self.chain.names:
            self.params[n].copy_(self._saved[n] * view[n] if done else self._saved[n])
        self._view = j

    # ---------------------------------------------------------------- report, checkpoint
    def report(self) -> dict[str, Any]:
        return {**{k: copy.deepcopy(v) for k, v in self.stats.items()},
                "model_size": self.stats["size_total"][-1] if self.stats["size_total"] else 1.0,
                "size_unit": f"base MLP ({self.base} units per hidden layer, conv/linear weights of the backbone)",
                "open_units": [int(self.chain.open(i).sum()) for i in range(len(self.chain.width))]}

    def state_dict(self) -> dict[str, Any]:
        return {"stamp": self.chain.stamp, "masks": self.masks.state_dict(), "done": self.done,
                "stats": copy.deepcopy(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chain.stamp = [s.to(self.device) for s in state["stamp"]]
        self.masks.load_state_dict(state["masks"])
        self.done = int(state["done"])
        self.stats = copy.deepcopy(state["stats"])
