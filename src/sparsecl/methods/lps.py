"""Learn-Prune-Share (``lps``, Wang, Jian, Chowdhury, Wang, Dy & Ioannidis, "Learn-Prune-Share for
Lifelong Learning", ICDM 2020), Task-IL: one network, a pruned subnetwork per task, and a learned
selection of which earlier tasks' weights each new task shares.

For task t (the mechanism of the authors' code, ``neu-spiral/LPSforLifelong``, ``main.py`` /
``admm.py``):

1. **learn** (the run's epochs): train the free weights (owned by no task); the earlier tasks'
   weights take part in the forward pass, frozen bit-exactly
   (:class:`~sparsecl.sparse.ownership.FrozenGuard`);
2. **ADMM prune** (``rho_num`` stages of ``admm_epochs`` epochs, rho = ``rho * 10^stage``): the
   loss gets ``rho/2 ||W - Z + U||^2`` over the free weights, ``Z`` the Euclidean projection of
   ``W + U`` onto "keep ``k`` weights per layer" (the ``k`` largest by magnitude), ``U`` the scaled
   dual (``U += W - Z``), Z and U recomputed at the start of every epoch of a stage but the first
   (the authors: every ``admm-epochs`` epochs; with our short budgets, every epoch). From the
   second task on, a *selection mask* ``s`` over the earlier tasks' weights (initialised at 1,
   the effective weight is ``s * w``) is learned in the same loss with its own ADMM term
   ``rho/2 ||s - Y + K||^2``, ``Y`` the 0/1 projection keeping the top ``share_ratio`` of ``s``
   per layer (the authors' ``adaptive-ratio``, 0.9 in their CIFAR script);
3. **hard prune and select**: the free weights outside the top ``k`` become 0, ``s`` is
   binarised to its top ``share_ratio`` (the weights this task shares);
4. **masked retrain** (``retrain_epochs``): the kept weights are retrained with the pruned ones
   held at 0 and the selection fixed; the kept weights then belong to task t and are frozen.

``k`` is a share ``keep_fraction`` of the layer's free weights (default ``1 / tasks left``, as our
PackNet: the authors give per-task ratios, e.g. ``--config-setting 5,1,1,1,1,1``); the last task
keeps every free weight (no pruning, as the authors' "leave space for future learning" switch does
only before the last task) but still learns its selection. Task j is evaluated with its own weights,
the earlier weights it selected, its head and its snapshot of the shared tensors (BatchNorm,
biases), so the accuracy of a finished task never changes.

Differences, on purpose: plain SGD at the run's lr in every phase (the authors: Adam with warm-up
and cosine schedule, mixup and label smoothing in their CIFAR script); the selection mask is
per weight on every isolated layer (the authors' ``w_mask`` layers) with the same share in each
layer. It is PackNet's machinery (:class:`~sparsecl.methods.packnet.PackNet`) with ADMM pruning
instead of one-shot magnitude pruning and with learned sharing instead of using every earlier
weight. Model size per task (``result.json`` -> ``method``): weights task j uses (own + shared) /
isolated weights; capacity as PackNet's (the backbone's owned fraction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import Batch, register_method
from sparsecl.methods.packnet import PackNet, PackNetOptions
from sparsecl.methods.phases import run_epochs
from sparsecl.sparse.masks import topk_mask


@dataclass
class LPSOptions(PackNetOptions):
    rho: float = 0.01  # first ADMM penalty (the authors' CIFAR script: --rho 0.01)
    rho_num: int = 3  # ADMM stages, rho multiplied by 10 each (--rho-num 3)
    admm_epochs: int = 1  # epochs per ADMM stage
    share_ratio: float = 0.9  # share of the earlier tasks' weights a task selects (--adaptive-ratio 0.9)

    def validate(self) -> None:
        super().validate()
        if not self.rho > 0:
            raise SparseCLError(f"rho must be > 0, got {self.rho}")
        if self.rho_num < 0 or self.admm_epochs < 0:
            raise SparseCLError("rho_num and admm_epochs must be >= 0")
        if not 0 < self.share_ratio <= 1:
            raise SparseCLError(f"share_ratio must be in (0, 1], got {self.share_ratio}")


def _project_topk(v: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` entries of ``allowed`` with the largest ``|v|``."""
    return topk_mask(v.detach().abs().masked_fill(~allowed, -1.0), k)


@register_method
class LPS(PackNet, sparse_kernels=False):
    """ADMM-pruned subnetwork per task, sharing a learned selection of earlier tasks' weights."""

    name = "lps"
    description = "LPS (Learn-Prune-Share): ADMM pruning per task + learned sharing of earlier weights (Task-IL)"
    options_cls = LPSOptions
    # sparse_kernels=False: its forward substitutes selected weights (functional_call), untested on the kernels

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self.selections: list[dict[str, torch.Tensor]] = []  # per task: earlier weights it shares
        self._gate: dict[str, torch.Tensor] | None = None  # selection in force (scores or 0/1)
        self._old: dict[str, torch.Tensor] = {}  # while it is: the earlier tasks' (frozen) weights
        self._penalty = None  # ADMM terms of the current stage (a closure) or None

    # ------------------------------------------------------------------ training
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate is None:
            return self.net(x)
        params = dict(self.model.named_parameters())
        eff = {n: params[n] * torch.where(self._old[n], g, torch.ones_like(g)) for n, g in self._gate.items()}
        return functional_call(self.model, eff, (x,))

    def observe(self, batch: Batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self._forward(batch.x), batch.y, batch.task_id)
        total = loss if self._penalty is None else loss + self._penalty()
        total.backward()
        self.optimizer.step()
        return loss.detach()

    def _counts(self, task: Task) -> dict[str, int]:
        return {n: int(m.sum()) for n, m in self._keep(task).items()}

    def end_task(self, task: Task) -> None:
        t, counts = task.index, self._counts(task)
        old = self._old = {n: self.ownership.owned(n) for n in self.ownership.names}
        scores = {n: nn.Parameter(torch.ones_like(old[n], dtype=torch.float32)) for n in old} if t > 0 else {}
        self._gate = scores or None
        for stage in range(self.options.rho_num):
            self._admm_stage(task, self.options.rho * 10 ** stage, counts, old, scores)
        self._penalty = None
        keep = self._keep(task)
        selection = {n: self._select(scores[n], old[n]) for n in scores}
        self._gate = {n: m.float() for n, m in selection.items()} or None
        self._pack(task, keep)
        self._gate = None
        self.selections.append(selection)

    def _select(self, score: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """The top ``share_ratio`` of the earlier weights by selection score (0/1 projection)."""
        return topk_mask(score.detach().masked_fill(~old, -math.inf), math.ceil(self.options.share_ratio * int(old.sum())))

    def _admm_stage(self, task: Task, rho: float, counts: dict[str, int], old: dict[str, torch.Tensor],
                    scores: dict[str, nn.Parameter]) -> None:
        """``admm_epochs`` epochs with the ADMM terms at penalty ``rho`` (Z, U, Y, K re-initialised)."""
        params = dict(self.model.named_parameters())
        self._fresh_optimizer(task, [*self.model.parameters(), *scores.values()])
        free = {n: self.ownership.free(n) for n in counts}
        z: dict[str, torch.Tensor] = {}
        y: dict[str, torch.Tensor] = {}
        u = {n: torch.zeros_like(params[n]) for n in counts}
        kk = {n: torch.zeros_like(s) for n, s in scores.items()}

        @torch.no_grad()
        def update(first: bool) -> None:
            for n in counts:
                w = params[n] * free[n]
                if not first:
                    w = w + u[n]
                z[n] = w * _project_topk(w, free[n], counts[n])
                if not first:
                    u[n] += (params[n] * free[n]) - z[n]
            for n, s in scores.items():
                v = s if first else s + kk[n]
                y[n] = self._select(v, old[n]).float()
                if not first:
                    kk[n] += (s - y[n]) * old[n]

        def penalty() -> torch.Tensor:
            terms = [((params[n] - z[n] + u[n]) * free[n]).pow(2).sum() for n in counts]
            terms += [((s - y[n] + kk[n]) * old[n]).pow(2).sum() for n, s in scores.items()]
            return 0.5 * rho * torch.stack(terms).sum()

        self._penalty = penalty
        for epoch in range(self.options.admm_epochs):
            update(first=epoch == 0)
            run_epochs(self, task.train, task.index, 1)

    # ---------------------------------------------------------------- evaluation
    def _view_mask(self, name: str, j: int) -> torch.Tensor:
        """Task ``j``'s own weights and the earlier weights it selected."""
        own = self.ownership.owned(name, task=j)
        return own | self.selections[j][name] if self.selections[j] else own

    def report(self) -> dict:
        total = sum(self.ownership.owner[n].numel() for n in self.ownership.names)
        size = [sum(int(self._view_mask(n, j).sum()) for n in self.ownership.names) / total
                for j in range(len(self.selections))]
        shared = [None] + [sum(int(s[n].sum()) for n in s) / max(sum(int(self.ownership.owned(n, upto=j - 1).sum())
                                                                    for n in s), 1)
                           for j, s in enumerate(self.selections) if j > 0]
        total_used = [round(self._used(j), 6) for j in range(len(size))]
        return {"size_task": [round(v, 6) for v in size], "size_total": total_used,
                "model_size": total_used[-1] if total_used else 0.0,
                "shared_fraction": [None if v is None else round(v, 6) for v in shared],
                "size_unit": "isolated conv/linear weights of the backbone"}

    def _used(self, j: int) -> float:
        total = sum(o.numel() for o in self.ownership.owner.values())
        return sum(int(self.ownership.owned(n, upto=j).sum()) for n in self.ownership.names) / total

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {**super().state_dict(), "selections": self.selections}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.selections = [{n: m.to(self.device) for n, m in s.items()} for s in state["selections"]]
