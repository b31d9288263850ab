"""SparCL (Wang et al., NeurIPS 2022): sparse continual learning on top of a replay method.

Three components, each of which can be switched off for the ablation of the paper's Table 3
(``-o tdm=false``, ``-o ddr=false``, ``-o dgm=false``). Registered as ``sparcl-er`` and
``sparcl-der++``; :class:`SparCL` is a mixin that combines with any replay method whose
``step_loss`` hands its logits to ``before_backward`` (:class:`~sparsecl.methods.base.StepOutputs`:
the current batch's logits and the labelled buffer minibatch's), whatever order its forwards run in.

**Task-aware dynamic masking (TDM).** One mask at sparsity ``s`` for all tasks, uniform per layer
over the masked layers (``policy``; the seq-cifar10 presets mask the 3x3 convs of the residual
blocks, as SparCL's code does), random at the start. Continual weight importance
``CWI(w) = |w| + cwi_alpha |g_cur(w)| + cwi_beta |g_buf(w)|`` where ``g_cur`` is the gradient of
the single-head cross-entropy of the current data (other tasks' logits at -inf) and ``g_buf`` the
gradient of the cross-entropy of buffer data (the replay method's labelled buffer minibatch), each
averaged over the gathering steps since the last mask update. They cost no extra forward pass: on
every ``importance_every``-th step of a stage (its first included) two ``autograd.grad`` calls run
through the logits the step's own forward produced (``before_backward``), before its training
backward. Their backward passes are the selection cost, charged apart from the training
FLOPs (``flops.selection`` in result.json); none run in the last stage of a task unless DGM
refreshes still read them. A task's training is cut into stages of ``delta_k`` epochs (fractions
allowed: seq-mnist trains one epoch per task). At the end of each stage but the last:

- *inter-task* (first stage end of tasks 2, 3, ...): the ``p_inter`` share of each layer that was
  added at random when the task began is removed again, lowest CWI first, back to ``s``;
- *intra-task*: drop the ``p_intra`` share of each layer with the lowest CWI and regrow as many at
  random among the inactive weights (new weights start at zero).

So the density is exactly ``1 - s`` except in the documented window from the start of task t > 1
to its first stage end, where it is ``1 - s + p_inter``. The last stage keeps the mask fixed.

**Dynamic data removal (DDR).** Every training example of the task counts its misclassifications
(argmax over the classes seen so far, on the training forward pass) and its visits during each
stage. At the end of stages 1 .. ``ddr_cutoff`` the examples trained on in that stage with the
fewest misclassifications per visit are removed (ties at random), ``ddr_rho / ddr_cutoff`` of the
task's data each time (exact counts: ``round(ddr_rho * n)`` are gone after the cutoff stage, as
long as each stage visits enough examples). Examples not visited in a stage are never candidates.
Removed examples are never trained on or offered to the buffer again in that task (the rest of
the epoch drops them, so it has fewer full batches); the buffer's earlier examples are untouched.

**Dynamic gradient masking (DGM).** Among the active weights, keep only the gradients with the
highest ``CGI = cwi_alpha |g_cur| + cwi_beta |g_buf|`` so that the total gradient sparsity is
``grad_sparsity`` (default ``s + 0.2 (1 - s)``: 0.80 at s = 0.75 and 0.92 at s = 0.90, the
paper's pairs), refreshed at every mask update and every ``dgm_interval`` steps; before a task's
first refresh every active weight gets its gradient. DGM needs plain SGD (momentum and weight decay
would still move the weights whose gradient is masked).

Decisions where the paper is silent: the importance and misclassification statistics restart at
every task (a new data distribution); the importance gradients come from the step's training-mode
forward (BatchNorm batch statistics, as the training loss sees them); stages follow the data
actually trained (after DDR an epoch is shorter); only active weights' importance gradients are
kept (what the selection cost charges, and what real sparse kernels compute), so a weight regrown
at a stage end has CGI 0 and gets no gradient under DGM until the next refresh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import Batch, StepOutputs, register_method
from sparsecl.methods.derpp import DERpp, DERppOptions
from sparsecl.methods.er import ER, ReplayOptions
from sparsecl.methods.masked import MaskedTraining, MaskOptions
from sparsecl.sparse.growth import drop_and_grow_, drop_lowest, grow
from sparsecl.sparse.masks import MaskSet, topk_mask


def stage_count(epochs: int, delta_k: float) -> int:
    """Stages of ``delta_k`` epochs in a task of ``epochs`` (the last may be shorter)."""
    return math.ceil(epochs / delta_k - 1e-9)


def stage_ends_by(progress: float, stage: int, n_stages: int, delta_k: float) -> bool:
    """Whether stage ``stage`` (0-based, not the last) has ended at ``progress`` epochs."""
    return stage < n_stages - 1 and progress >= (stage + 1) * delta_k - 1e-9


def ddr_target(rho: float, n: int, stage: int, cutoff: int) -> int:
    """Examples of a task of ``n`` that DDR has removed once stage ``stage`` (1-based) ended."""
    return round(rho * n * min(stage, cutoff) / cutoff)


@dataclass
class SparCLFields:
    """SparCL's own options (mixed into the options of the replay method it runs on)."""

    cwi_alpha: float = 0.5  # weight of |g_cur| in CWI and CGI
    cwi_beta: float = 1.0  # weight of |g_buf| in CWI and CGI
    delta_k: float = 5.0  # epochs per stage (mask update / data removal interval); fractions allowed
    p_intra: float = 0.005  # share of each layer dropped and regrown at every stage end
    p_inter: float = 0.01  # share of each layer added at a task's start and removed at its first stage end
    # gather CWI/CGI gradients on every N-th step of a stage (its first included), from that step's
    # own graph (SPEC: a subset of steps; 64 keeps the selection cost of seq-cifar10 SparCL-DER++
    # under 2 % of the training FLOPs in both FLOP conventions: 0.75 % spec, 1.4 % sparcl-paper)
    importance_every: int = 64
    tdm: bool = True  # task-aware dynamic masking (off: the initial random mask stays fixed)
    ddr: bool = True  # dynamic data removal
    ddr_rho: float = 0.3  # share of each task's data removed by the cutoff stage
    ddr_cutoff: int = 4  # last stage after which data is removed
    dgm: bool = True  # dynamic gradient masking
    grad_sparsity: float | None = None  # total gradient sparsity s + q; None = s + 0.2 (1 - s)
    dgm_interval: int = 100  # steps between gradient-mask refreshes (besides every mask update); 0 = only then

    def validate_sparcl(self) -> None:
        if self.cwi_alpha < 0 or self.cwi_beta < 0:
            raise SparseCLError("cwi_alpha and cwi_beta must be >= 0")
        if not self.delta_k > 0:
            raise SparseCLError(f"delta_k must be > 0 epochs, got {self.delta_k}")
        for key in ("p_intra", "p_inter"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise SparseCLError(f"{key} must lie in [0, 1), got {getattr(self, key)}")
        if self.importance_every < 1:
            raise SparseCLError(f"importance_every must be >= 1, got {self.importance_every}")
        if not 0.0 <= self.ddr_rho < 1.0:
            raise SparseCLError(f"ddr_rho must lie in [0, 1), got {self.ddr_rho}")
        if self.ddr_cutoff < 1:
            raise SparseCLError(f"ddr_cutoff must be >= 1, got {self.ddr_cutoff}")
        if self.dgm_interval < 0:
            raise SparseCLError(f"dgm_interval must be >= 0, got {self.dgm_interval}")
        gs = self.effective_grad_sparsity()
        if self.dgm and not self.sparsity <= gs < 1.0:
            raise SparseCLError(f"grad_sparsity must lie in [sparsity, 1) = [{self.sparsity}, 1), got {gs}")
        if self.dgm and (self.momentum > 0 or self.weight_decay > 0 or self.optimizer != "sgd"):
            raise SparseCLError("dgm needs plain SGD (momentum 0, weight_decay 0): otherwise weights "
                                "whose gradient is masked still move; use -o dgm=false")

    def effective_grad_sparsity(self) -> float:
        s = self.sparsity  # a MaskOptions field of the combined options
        return s + 0.2 * (1.0 - s) if self.grad_sparsity is None else float(self.grad_sparsity)


def importance_read(o: SparCLFields, stage: int, n_stages: int) -> bool:
    """Whether anything reads importance gathered in ``stage``: mask updates (every stage but the
    last ends in one) or DGM refreshes (at stage ends, and every ``dgm_interval`` steps)."""
    if stage < n_stages - 1:
        return o.tdm or o.dgm
    return o.dgm and o.dgm_interval > 0


class SparCL(MaskedTraining):
    """Mixin: TDM, DDR and DGM around a replay method (put it before the method's class)."""

    graph_capturable = False

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        o = options
        self.n_stages = stage_count(ctx.epochs, o.delta_k)
        if o.tdm and o.p_inter > 0 and self.n_stages < 2:
            raise SparseCLError(f"delta_k={o.delta_k} leaves one stage per task ({ctx.epochs} epochs): the "
                                "inter-task expansion could never shrink back; use a smaller delta_k")
        if o.ddr and o.ddr_rho > 0 and o.ddr_cutoff > self.n_stages - 1:
            raise SparseCLError(f"ddr_cutoff={o.ddr_cutoff} needs at least {o.ddr_cutoff + 1} stages per task, "
                                f"but {ctx.epochs} epochs / delta_k {o.delta_k} give {self.n_stages}")
        self.grad_sparsity = o.effective_grad_sparsity() if o.dgm else None
        self.install_masks(MaskSet.from_counts(model, self.layer_counts()))
        self.history: list[dict[str, Any]] = []  # per task: stages, data counts (report())

    # ------------------------------------------------------------------ task start
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        n = len(self.train_split(task))
        dev = self.device
        self._g_cur = [torch.zeros_like(self.masks.params[k]) for k in self.mask_names]
        self._g_buf = [torch.zeros_like(self.masks.params[k]) for k in self.mask_names]
        self._n_cur = self._n_buf = 0
        self._wrong = torch.zeros(n, dtype=torch.int32, device=dev)
        self._visits = torch.zeros(n, dtype=torch.int32, device=dev)  # training visits in this stage
        self._removed = torch.zeros(n, dtype=torch.bool, device=dev)
        self._n_removed = 0
        self._stage = 0  # stage ends done in this task
        self._epoch, self._batch, self._batches = 0, 0, 1
        self._trim = False  # data removed mid-epoch: the rest of this epoch's order must drop it
        self._steps = 0
        self._stage_steps = 0  # steps since the stage began (its first step gathers importance)
        self._seen = self.class_task <= task.index  # classes seen so far (misclassification argmax)
        self._expanded: dict[str, int] = {}
        if self.masks is not None:
            self.masks.clear_grad_masks()
        if self.options.tdm and task.index > 0 and self.options.p_inter > 0:
            self._inter_task_expand()
        self.history.append({"task": task.index, "train_examples": n, "stages": [],
                             "density_at_start": self.masks.density()})

    @torch.no_grad()
    def _inter_task_expand(self) -> None:
        """Add ``p_inter`` of each layer at random among the inactive weights (new weights are 0)."""
        for name in self.mask_names:
            numel, active = self.masks.numel(name), self.masks.active(name)
            k = min(round(self.options.p_inter * numel), numel - active)
            if k <= 0:
                continue
            grown, k = grow(self.masks.masks[name], k, "random", n_candidates=numel - active)
            self.masks.params[name].masked_fill_(grown, 0.0)
            self.masks.set_mask(name, self.masks.masks[name] | grown, count=active + k, push=False)
            self._expanded[name] = k
        self.masks.push_flops()

    # ------------------------------------------------------------------ data removal
    def epoch_indices(self, task: Task, epoch: int) -> torch.Tensor | None:
        n = len(self._removed)
        kept = n - self._n_removed
        self._epoch, self._batch = epoch, 0
        self._batches = max(1, math.ceil(kept / self.ctx.batch_size))
        self._trim = False
        if self._n_removed == 0:
            return None
        return torch.nonzero(~self._removed).squeeze(1)

    def epoch_rest(self, rest: torch.Tensor) -> torch.Tensor | None:
        if not self._trim:
            return None
        self._trim = False
        rest = rest[~self._removed[rest]]
        self._batches = self._batch + math.ceil(rest.shape[0] / self.ctx.batch_size)
        return rest

    def _count_misclassified(self, step: StepOutputs) -> None:
        """One visit of each example of the step's batch, and whether its training-forward logits
        (argmax over the classes seen so far) got it wrong."""
        index, y = step.batch.index, step.batch.y
        logits = step.current.detach().masked_fill(~self._seen, float("-inf"))
        self._wrong.index_add_(0, index, (logits.argmax(1) != y).int())
        self._visits.index_add_(0, index, torch.ones_like(index, dtype=torch.int32))

    @torch.no_grad()
    def _remove_data(self) -> int:
        """Remove the next ``rho / cutoff`` share among the examples trained on in this stage:
        fewest misclassifications per visit first, ties at random. Unvisited examples are never
        candidates (a stage shorter than an epoch would otherwise remove them as "easiest")."""
        n = len(self._removed)
        target = ddr_target(self.options.ddr_rho, n, self._stage, self.options.ddr_cutoff)
        candidates = (self._visits > 0) & ~self._removed
        k = min(target - self._n_removed, int(candidates.sum()))
        if k <= 0:
            return 0
        rate = self._wrong.float() / self._visits.clamp(min=1).float()
        rate.masked_fill_(~candidates, float("inf"))
        shuffled = torch.randperm(n, device=self.device)  # random order among equal rates
        order = shuffled[torch.argsort(rate[shuffled], stable=True)]
        self._removed[order[:k]] = True
        self._n_removed += k
        return k

    # ------------------------------------------------------------------ importance
    def _importance_read(self) -> bool:
        return importance_read(self.options, self._stage, self.n_stages)

    def _gathers(self) -> bool:
        """Whether this step's graph gives the importance gradients (every ``importance_every``-th
        step of a stage, its first included, while something reads them)."""
        return self._stage_steps % self.options.importance_every == 0 and self._importance_read()

    def before_backward(self, step: StepOutputs) -> None:
        """DDR's misclassification count from the current batch's logits; on gathering steps g_cur
        (single-head CE of the current logits) and g_buf (CE of the buffer minibatch's logits) by
        backward passes through the step's own graph, which the training backward then reuses.
        Charged as selection cost: one backward (every active weight's gradient) of the forward
        rows each traverses."""
        super().before_backward(step)
        if self.options.ddr:
            self._count_misclassified(step)
        if not self._gathers():
            return
        rows = step.current_rows
        loss = F.cross_entropy(self.mask_logits(step.current, step.batch.task_id), step.batch.y)
        self._gather_grads(self._g_cur, loss)
        self._n_cur += 1
        if step.buffer is not None:
            self._gather_grads(self._g_buf, self.loss(step.buffer, step.buffer_y, step.buffer_task))
            self._n_buf += 1
            rows += step.buffer_rows
        self.ctx.flops.selection_samples(rows)

    def _gather_grads(self, into: list[torch.Tensor], loss: torch.Tensor) -> None:
        """Add every active weight's gradient of ``loss`` to ``into``, whatever the gradient masks.
        Inactive weights' gradients are not kept: they are not charged (nor, on the sparse kernels,
        computed), so a weight grown at a stage end has no CGI until the next gathering step."""
        weights = [self.masks.params[n] for n in self.mask_names]
        with self.masks.active_weight_grads():
            grads = list(torch.autograd.grad(loss, weights, retain_graph=True))
        torch._foreach_mul_(grads, [self.masks.masks[n] for n in self.mask_names])
        torch._foreach_add_(into, grads)

    def _scores(self, with_weight: bool) -> dict[str, torch.Tensor]:
        """CWI (``with_weight``) or CGI per masked layer from the averaged gradients."""
        a = self.options.cwi_alpha / max(self._n_cur, 1)
        b = self.options.cwi_beta / max(self._n_buf, 1)
        out = {}
        for name, gc, gb in zip(self.mask_names, self._g_cur, self._g_buf):
            s = a * gc.abs() + b * gb.abs()
            if with_weight:
                s = s + self.masks.params[name].detach().abs()
            out[name] = s
        return out

    def _reset_importance(self) -> None:
        for g in (*self._g_cur, *self._g_buf):
            g.zero_()
        self._n_cur = self._n_buf = 0

    @torch.no_grad()
    def _update_mask(self) -> None:
        """Inter-task shrink (first stage end of a later task), then intra-task shrink-and-expand."""
        cwi = self._scores(with_weight=True)
        for name in self.mask_names:
            k = self._expanded.pop(name, 0)
            if k:
                active = self.masks.active(name)
                kept = drop_lowest(self.masks.masks[name], cwi[name], k)
                self.masks.params[name].mul_(kept)
                self.masks.set_mask(name, kept, count=active - k, push=False)
            k = round(self.options.p_intra * self.masks.numel(name))
            if k > 0:
                drop_and_grow_(self.masks, name, k, "random", drop_score=cwi[name], optimizer=self.optimizer)
        self.masks.push_flops()

    @torch.no_grad()
    def _refresh_grad_masks(self) -> None:
        """DGM: among active weights keep the top-CGI gradients, total gradient density 1 - (s + q)."""
        if self._n_cur == 0:
            return
        cgi = self._scores(with_weight=False)
        for name in self.mask_names:
            mask = self.masks.masks[name]
            k = min(round((1.0 - self.grad_sparsity) * self.masks.numel(name)), self.masks.active(name))
            self.masks.set_grad_mask(name, topk_mask(cgi[name].masked_fill(~mask, float("-inf")), k),
                                     count=k, push=False)
        self.masks.push_flops()

    # ------------------------------------------------------------------ training
    def observe(self, batch: Batch) -> torch.Tensor:
        loss = super().observe(batch)
        self._steps += 1
        self._stage_steps += 1
        if self.options.dgm and self.options.dgm_interval and self._steps % self.options.dgm_interval == 0:
            self._refresh_grad_masks()
        self._batch += 1
        # Stage ends inside an epoch (fractional delta_k); ends at an epoch's end run in end_epoch.
        progress = self._epoch + min(self._batch / self._batches, 1.0 - 1e-9)
        self._stage_ends_upto(progress)
        return loss

    def end_epoch(self, task: Task, epoch: int) -> None:
        super().end_epoch(task, epoch)
        self._stage_ends_upto(epoch + 1.0)

    def _stage_ends_upto(self, progress: float) -> None:
        while stage_ends_by(progress, self._stage, self.n_stages, self.options.delta_k):
            self._stage_end()

    def _stage_end(self) -> None:
        self._stage += 1
        o = self.options
        removed = 0
        if o.tdm:
            self._update_mask()
        if o.ddr and self._stage <= o.ddr_cutoff:
            removed = self._remove_data()
            self._trim = removed > 0  # the rest of this epoch drops them; later epochs never draw them
        if o.dgm:
            self._refresh_grad_masks()
        self._reset_importance()
        self._wrong.zero_()
        self._visits.zero_()
        self._stage_steps = 0
        self.history[-1]["stages"].append({
            "stage": self._stage, "at_epoch": round(self._stage * o.delta_k, 6), "removed": removed,
            "kept_examples": len(self._removed) - self._n_removed, "density": self.masks.density(),
            "grad_density": self.masks.grad_density(),
        })

    def end_task(self, task: Task) -> None:
        super().end_task(task)
        h = self.history[-1]
        h["removed_examples"] = self._n_removed
        h["kept_examples"] = len(self._removed) - self._n_removed
        h["density_at_end"] = self.masks.density()
        h["grad_density_at_end"] = self.masks.grad_density()

    # ------------------------------------------------------------------ results and checkpoints
    def report(self) -> dict[str, Any]:
        o = self.options
        return {"sparcl": {
            "components": {"tdm": o.tdm, "ddr": o.ddr, "dgm": o.dgm}, "sparsity": o.sparsity,
            "grad_sparsity": self.grad_sparsity, "stages_per_task": self.n_stages, "tasks": self.history,
        }}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["sparcl_history"] = self.history
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = list(state["sparcl_history"])


class SparCLValidation:
    """Put first in a SparCL options class: the replay method's checks, then the masks' and SparCL's."""

    def validate(self) -> None:
        super().validate()
        self.validate_masks()
        self.validate_sparcl()


@dataclass
class SparCLEROptions(SparCLValidation, ReplayOptions, MaskOptions, SparCLFields):
    lr: float = 0.1
    sparsity: float = 0.75
    # ER forwards current and buffer rows together, so each importance gradient traverses both:
    # twice DER++'s selection cost per gathering step (128: 1.2 % spec, 1.8 % sparcl-paper)
    importance_every: int = 128


@register_method
class SparCLER(SparCL, ER, compile=True):
    """SparCL (TDM + DDR + DGM) on experience replay."""

    name = "sparcl-er"
    description = "SparCL-ER: ER with task-aware dynamic masking, dynamic data removal, gradient masking"
    options_cls = SparCLEROptions
    # compile: the importance passes and the replay step go through self.net


@dataclass
class SparCLDERppOptions(SparCLValidation, DERppOptions, MaskOptions, SparCLFields):
    sparsity: float = 0.75


@register_method
class SparCLDERpp(SparCL, DERpp, compile=True):
    """SparCL (TDM + DDR + DGM) on DER++."""

    name = "sparcl-der++"
    description = "SparCL-DER++: DER++ with task-aware dynamic masking, dynamic data removal, gradient masking"
    options_cls = SparCLDERppOptions
