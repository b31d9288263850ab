"""EsaCL (Ren & Honavar, "EsaCL: An Efficient Continual Learning Algorithm"; SPEC "EsaCL").

Registered as ``esacl`` (on fine-tuning), ``esacl-er``, ``esacl-der++`` and ``esacl-ewc``: the same
mixin (:class:`EsaCLMixin`) on top of :class:`~sparsecl.methods.er.ER`,
:class:`~sparsecl.methods.derpp.DERpp` and :class:`~sparsecl.methods.ewc.OnlineEWC`, whose losses
are used unchanged: each SAM pass is the parent's ``compute_gradients`` (its ``step_loss`` on the
selected examples, then backward), and the mixin steps the :class:`~sparsecl.optim.SAM` optimiser
itself: the ascent after the first pass, the real update after the second. The parent's
``after_step`` (the replay buffer's ``remember``) runs once per step.

One training step on a batch ``B`` of the current task (Algorithm 1):

1. *selection* (SSE/ERE, if either is on): a forward pass on ``B`` at ``theta`` without autograd
   (BatchNorm running statistics untouched) gives per-example cross-entropy; ``J = ceil(keep_frac
   * |B|)`` examples with the highest loss are kept (40% by default). SSE uses them for the ascent,
   ERE for the descent; with both on (the default) both passes use the same ``J`` examples, as in
   Algorithm 1 (line 6 uses ``B_s`` for both). Replay methods add their buffer terms as usual.
   ``selection=per-class`` keeps the highest losses within each class instead (J shared over the
   batch's classes in proportion to their counts): with BatchNorm, a batch-wide top J is often one
   class, whose batch statistics then remove the features that separate it.
2. *SAM ascent*: the parent's loss on the support examples, ``eps = rho * g / ||g||``.
3. *descent* at ``theta + eps`` on the kept examples; ``theta`` restored exactly, then the base
   optimiser steps: stochastic Frank-Wolfe over one K-sparse polytope per prunable layer
   (``polytope``, :class:`~sparsecl.optim.StochasticFrankWolfe`), or the configured SGD/Adam
   (``polytope=false``, the paper's "w/o SP"). BatchNorm running statistics are updated by the
   first pass at ``theta`` only. Buffer draws (and their augmentation) are the same in both passes
   (the random state is rewound before the descent), as SAM evaluates both gradients on one batch.
4. The replay buffer is offered the whole batch ``B`` once per step; DER++ stores logits at
   ``theta`` (from the selection pass, or from the ascent pass when nothing was selected).

End of each task: the current task's test accuracy (Class-IL and Task-IL) is measured right before
and right after a one-shot magnitude pruning of every prunable layer (:class:`~sparsecl.sparse.MaskPolicy`,
``conv-linear`` by default) to sparsity ``s`` with exact per-layer counts (uniform allocation,
top-k of ``|w|``), with no retraining (``bn_recalibrate=N`` then re-estimates the BatchNorm running
statistics from N batches of the task's training data, weights untouched, and records the accuracy
once more); the evaluation after the task (the accuracy matrix) sees the
pruned model, and the masks are bound to the FLOP counter while in force. At the start of the next
task the pruned positions are *expanded*: re-initialised to ``expand_scale`` (0.1) times a fresh
default initialisation of the layer (PyTorch's ``reset_parameters`` on a copy), and the layers run
dense again. ``isolate`` (Algorithm 1 line 12): the weights kept by a prune are frozen for the rest
of the run (:class:`~sparsecl.sparse.TaskOwnership` records the task, a
:class:`~sparsecl.sparse.FrozenGuard` and the Frank-Wolfe frozen masks keep them bit-identical and
out of the LMO); each later prune keeps ``1 - s`` of the weights trained in that task (the free ones).

The last task's prune is final: the model returned is sparse. Accounting: the selection pass is
charged as forward-only samples and both SAM passes as training samples (the engine's forward
hook sees them); the diagnostic accuracies around the prune call ``model.forward`` directly and
are not charged (evaluation, not training).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, Batch, ContinualMethod, MethodOptions, register_method
from sparsecl.methods.derpp import DERpp, DERppOptions
from sparsecl.methods.er import ER, ReplayOptions
from sparsecl.methods.ewc import EWCOptions, OnlineEWC
from sparsecl.metrics.predictions import correct_predictions, percent
from sparsecl.models.batchnorm import frozen_bn_stats, reestimate_bn_stats
from sparsecl.optim.frank_wolfe import RESCALES, StochasticFrankWolfe, ksparse_radius
from sparsecl.optim.sam import SAM
from sparsecl.sparse.allocation import allocate, check_sparsity, density_counts
from sparsecl.sparse.masks import MaskSet, topk_mask
from sparsecl.sparse.ownership import FrozenGuard, TaskOwnership
from sparsecl.sparse.policy import PRESETS, MaskPolicy

RADIUS_MODES = ("init", "radius")


SELECTIONS = ("batch", "per-class")


def top_j_per_class(losses: torch.Tensor, y: torch.Tensor, j: int, n_classes: int) -> torch.Tensor:
    """Indices of ``j`` examples: the highest ``losses`` within each class of ``y``, with ``j``
    split over the classes present in proportion to their counts (largest remainders, ties to
    the lower label). Runs on the device without a host synchronisation."""
    b = y.shape[0]
    counts = torch.zeros(n_classes, dtype=torch.long, device=y.device).scatter_add_(0, y, torch.ones_like(y))
    quota = counts * j // b
    remainder = counts * j % b  # the largest remainders get the j - sum(quota) leftover slots
    extra = j - quota.sum()
    order = torch.argsort(remainder * n_classes + (n_classes - 1 - torch.arange(n_classes, device=y.device)),
                          descending=True)
    bonus = torch.zeros_like(quota).scatter_(0, order, (torch.arange(n_classes, device=y.device) < extra).long())
    quota = quota + bonus
    by_loss = torch.argsort(losses, descending=True, stable=True)
    ranked = by_loss[torch.argsort(y[by_loss], stable=True)]  # grouped by class, highest loss first
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(b, device=y.device) - start[y[ranked]]
    keep = rank < quota[y[ranked]]
    return ranked[torch.argsort((~keep).to(torch.int8), stable=True)[:j]]


@dataclass
class EsaCLOptions(MethodOptions):
    """EsaCL's options (on top of the parent method's). Defaults: the paper's Split CIFAR-10 values."""

    lr: float = 0.01  # Frank-Wolfe step-size factor (or the SGD/Adam lr with polytope=false)
    sparsity: float = 0.8  # one-shot pruning sparsity s per prunable layer at the end of each task
    policy: str = "conv-linear"  # which layers are constrained and pruned (MaskPolicy preset)
    include_first: bool = False
    include_shortcuts: bool = False
    include_head: bool = False
    sam: bool = True  # sharpness-aware two-pass step (false = the paper's "w/o SA")
    rho: float = 0.05  # SAM radius
    polytope: bool = True  # Frank-Wolfe in K-sparse polytopes (false = "w/o SP": SAM + SGD + prune)
    k_frac: float = 0.05  # K = ceil(k_frac * n_l) per layer (the paper's "K")
    tau: float = 5.0  # polytope radius factor
    radius_mode: str = "init"  # init: r = tau * E||w_init|| / sqrt(K); radius: r = tau
    fw_momentum: float = 0.9
    rescale: str = "gradient"  # gradient: eta = clamp(lr ||m|| / ||theta - v||, 0, 1); none: eta = lr
    sse: bool = True  # support-example selection for the SAM ascent
    ere: bool = True  # redundant-example elimination for the descent
    keep_frac: float = 0.4  # J = ceil(keep_frac * batch) examples kept by SSE / ERE
    # batch: the J highest losses of the batch (paper, SPEC); per-class: the highest losses within
    # each class of the batch, J split over the classes in proportion to their counts. On BatchNorm
    # networks the batch-wide top J is often one class, whose batch statistics then cancel the very
    # signal that separates it (docs/results/esacl.md).
    selection: str = "batch"
    # after each prune, re-estimate the BatchNorm running statistics of the pruned model from this
    # many batches of the task's training data (forward passes only, no weight changes; 0 = off, as
    # the paper). The dense model's statistics no longer fit the pruned layers' outputs.
    bn_recalibrate: int = 0
    isolate: bool = False  # freeze the kept weights after each prune (Algorithm 1 as written)
    expand_scale: float = 0.1  # pruned positions restart at this times a fresh default init

    def validate(self) -> None:
        super().validate()
        check_sparsity(self.sparsity)
        if self.policy not in PRESETS:
            raise SparseCLError(f"unknown mask policy {self.policy!r} (known: {', '.join(PRESETS)})")
        if self.sam and not self.rho > 0:
            raise SparseCLError(f"rho must be > 0, got {self.rho}")
        if not 0.0 < self.k_frac <= 1.0:
            raise SparseCLError(f"k_frac must lie in (0, 1], got {self.k_frac}")
        if not self.tau > 0:
            raise SparseCLError(f"tau must be > 0, got {self.tau}")
        if self.radius_mode not in RADIUS_MODES:
            raise SparseCLError(f"unknown radius_mode {self.radius_mode!r} (known: {', '.join(RADIUS_MODES)})")
        if not 0.0 <= self.fw_momentum < 1.0:
            raise SparseCLError(f"fw_momentum must lie in [0, 1), got {self.fw_momentum}")
        if self.rescale not in RESCALES:
            raise SparseCLError(f"unknown rescale {self.rescale!r} (known: {', '.join(RESCALES)})")
        if not 0.0 < self.keep_frac <= 1.0:
            raise SparseCLError(f"keep_frac must lie in (0, 1], got {self.keep_frac}")
        if self.bn_recalibrate < 0:
            raise SparseCLError(f"bn_recalibrate must be >= 0 batches, got {self.bn_recalibrate}")
        if self.selection not in SELECTIONS:
            raise SparseCLError(f"unknown selection {self.selection!r} (known: {', '.join(SELECTIONS)})")
        if not self.expand_scale >= 0:
            raise SparseCLError(f"expand_scale must be >= 0, got {self.expand_scale}")
        if self.polytope:
            if self.optimizer != "sgd" or self.momentum != 0 or self.weight_decay != 0:
                raise SparseCLError("polytope=true steps with Frank-Wolfe (fw_momentum, no weight decay): "
                                    "optimizer/momentum/weight_decay apply only with polytope=false")
            if self.rescale == "none" and self.lr > 1:
                raise SparseCLError(f"rescale=none uses lr as the Frank-Wolfe step size, which must be <= 1, got {self.lr}")
        if self.isolate and self.sparsity == 0:
            raise SparseCLError("isolate needs sparsity > 0 (otherwise the first task freezes every weight)")

    def mask_policy(self) -> MaskPolicy:
        return MaskPolicy(self.policy, self.include_first, self.include_shortcuts, self.include_head)


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class EsaCLMixin:
    """EsaCL on top of a :class:`~sparsecl.methods.base.ContinualMethod` (see the module docstring).

    Put it first in the bases: ``class EsaCLER(EsaCLMixin, ER)``.
    """

    graph_capturable = False  # selection sizes, SAM's saved weights and the RNG rewind are host-side
    supports_sparse_kernels = True  # the layers run dense until a prune, then under its masks

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        o: EsaCLOptions = options
        policy = o.mask_policy()
        self.mask_scope = policy.describe()
        self.layer_names = policy.select(model)
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        self._layers = {n: modules[n.rsplit(".", 1)[0]] for n in self.layer_names}
        shapes = {n: tuple(params[n].shape) for n in self.layer_names}
        self.keep_counts = allocate("uniform", shapes, 1.0 - o.sparsity) if o.sparsity > 0 else {
            n: params[n].numel() for n in self.layer_names}
        self.k = {n: max(1, math.ceil(o.k_frac * params[n].numel())) for n in self.layer_names}
        self.radius = ({n: ksparse_radius(self._layers[n], self.k[n], o.tau, o.radius_mode) for n in self.layer_names}
                       if o.polytope else {})
        self.masks: MaskSet | None = None  # the last prune's masks, in force until the next task expands
        self.ownership = TaskOwnership(model, self.layer_names) if o.isolate else None
        self.base_optimizer: torch.optim.Optimizer | None = None
        self._guard: FrozenGuard | None = None
        self.records: list[dict[str, Any]] = []  # one per task: accuracy around the prune, densities

    # ------------------------------------------------------------------ optimiser
    def _frank_wolfe(self) -> StochasticFrankWolfe:
        o = self.options
        params = dict(self.model.named_parameters())
        constrained = set(self.layer_names)
        groups: list[dict[str, Any]] = [{"params": [params[n]], "k": self.k[n], "radius": self.radius[n]}
                                        for n in self.layer_names]
        rest = [p for n, p in params.items() if n not in constrained and p.requires_grad]
        if rest:
            groups.append({"params": rest})
        return StochasticFrankWolfe(groups, lr=o.lr, momentum=o.fw_momentum, rescale=o.rescale)

    def make_optimizer(self, params: Any = None) -> Any:
        """Frank-Wolfe (or the configured optimiser) with frozen weights guarded, wrapped in SAM."""
        o = self.options
        base = self._frank_wolfe() if o.polytope else super().make_optimizer(params)
        if self._guard is not None:
            self._guard.unhook()
            self._guard = None
        if self.ownership is not None and self.ownership.n_tasks > 0:
            frozen = {n: self.ownership.owned(n) for n in self.layer_names}
            self._guard = FrozenGuard(self.model, frozen)
            self._guard.hook_optimizer(base)
            if o.polytope:
                named = dict(self.model.named_parameters())
                for n, m in frozen.items():
                    base.set_frozen(named[n], m)
        if o.polytope:
            base.make_feasible_()  # a no-op unless a layer starts outside its polytope
        self.base_optimizer = base
        return SAM(base, o.rho) if o.sam else base

    # ------------------------------------------------------------------ training
    def example_losses(self, logits: torch.Tensor, y: torch.Tensor, task_id: int) -> torch.Tensor:
        """Per-example cross-entropy (Task-IL: over the task's own classes), the selection score."""
        if self.ctx.setting == TASK_IL:
            logits = self.mask_logits(logits, task_id)
        return F.cross_entropy(logits.float(), y, reduction="none")

    def select(self, batch: Batch) -> tuple[Batch, torch.Tensor | None]:
        """SSE/ERE: the ``J`` highest-loss examples of ``batch`` by a forward pass at ``theta`` without
        autograd (BatchNorm running statistics untouched), with that pass's fp32 logits of the
        whole batch; ``(batch, None)`` when nothing is selected."""
        o = self.options
        b = int(batch.y.shape[0])
        j = max(1, math.ceil(o.keep_frac * b))
        if not (o.sse or o.ere) or j >= b:
            return batch, None
        with torch.no_grad(), frozen_bn_stats(self.model):
            logits = self.model(batch.x)
        losses = self.example_losses(logits, batch.y, batch.task_id)
        if o.selection == "per-class":
            idx = top_j_per_class(losses, batch.y, j, logits.shape[1])
        else:
            idx = torch.topk(losses, j, sorted=False).indices
        sub = Batch(batch.x[idx], batch.y[idx], batch.x_raw[idx], batch.index[idx], batch.task_id)
        return sub, logits.detach().float()

    def observe(self, batch: Batch) -> torch.Tensor:
        o = self.options
        sub, theta_logits = self.select(batch)
        descent = sub if o.ere else batch
        if o.sam:
            rng = _rng_state(self.device)
            at_theta = self.compute_gradients(sub if o.sse else batch)
            self.optimizer.first_step()
            _set_rng_state(self.device, rng)  # same buffer draws and augmentations in the descent
            with frozen_bn_stats(self.model):
                last = self.compute_gradients(descent)
            self.optimizer.second_step()
        else:
            at_theta = last = self.compute_gradients(descent)
            self.optimizer.step()
        if at_theta.outputs.batch is not batch and "logits" in at_theta.stored:
            at_theta = replace(at_theta, stored={**at_theta.stored, "logits": theta_logits})
        self.after_step(batch, at_theta)  # the whole batch, once, with what the pass at theta stored
        return last.loss.detach()

    # ------------------------------------------------------------------ prune / expand
    def begin_task(self, task: Task) -> None:
        if self.masks is not None:
            self._expand()
        super().begin_task(task)

    @torch.no_grad()
    def _expand(self) -> None:
        """Re-initialise the pruned positions small; the layers run dense again."""
        params = dict(self.model.named_parameters())
        for n in self.layer_names:
            pruned = ~self.masks.masks[n]
            fresh = copy.deepcopy(self._layers[n])
            fresh.reset_parameters()
            params[n].copy_(torch.where(pruned, fresh.weight.detach() * self.options.expand_scale, params[n]))
        self.masks.unbind_flops()
        self.masks = None

    @torch.no_grad()
    def prune(self, task_index: int) -> MaskSet:
        """One-shot magnitude pruning of every prunable layer (no retraining); returns the masks in force."""
        params = dict(self.model.named_parameters())
        keep: dict[str, torch.Tensor] = {}
        for n in self.layer_names:
            score = params[n].detach().abs()
            if self.ownership is None:
                keep[n] = topk_mask(score, self.keep_counts[n])
                continue
            frozen = self.ownership.owned(n)
            n_free = int((~frozen).sum())
            k = density_counts({n: 1.0 - self.options.sparsity}, {n: n_free})[n]
            new = topk_mask(score.masked_fill(frozen, -1.0), k)
            self.ownership.assign_(n, new, task_index)
            keep[n] = frozen | new
        masks = MaskSet(self.model, keep)
        masks.apply_()
        self._install(masks)
        return masks

    def _install(self, masks: MaskSet) -> None:
        self.masks = masks
        masks.bind_flops(self.ctx.flops)

    @torch.no_grad()
    def recalibrate_bn(self, task: Task) -> bool:
        """Re-estimate the BatchNorm running statistics from ``bn_recalibrate`` batches of
        ``task``'s training data without augmentation; no weight changes. The passes go through
        the model, so the FLOP counter charges them as forward-only samples. Returns False when
        the model has no BatchNorm layer."""
        split = self.train_split(task)
        bs = self.ctx.batch_size
        order = torch.randperm(len(split), device=self.device)[: self.options.bn_recalibrate * bs]
        batches = (self.ctx.augment.eval(split.x[order[i : i + bs]])
                   for i in range(0, len(order) - 1, bs))  # a last batch of one has no batch statistics
        return reestimate_bn_stats(self.model, batches)

    def current_task_accuracy(self, task: Task, batch_size: int = 500) -> dict[str, float]:
        """Class-IL and Task-IL accuracy (percent) on ``task``'s test split, eval mode.

        Calls ``model.forward`` directly: the engine's sample counter does not charge it.
        """
        was_training = self.model.training
        self.model.eval()
        class_sets = [torch.nonzero(self.class_task <= task.index).flatten(),
                      torch.nonzero(self.class_task == task.index).flatten()]
        try:
            correct = correct_predictions(self.model.forward, task.test.x, task.test.y, class_sets, batch_size,
                                          self.ctx.augment.eval)
        finally:
            self.model.train(was_training)
        class_il, task_il = percent(correct, len(task.test))
        return {"class_il": class_il, "task_il": task_il}

    def end_task(self, task: Task) -> None:
        before = self.current_task_accuracy(task)
        masks = self.prune(task.index)
        after = self.current_task_accuracy(task)
        recalibrated = None
        if self.options.bn_recalibrate and self.recalibrate_bn(task):
            recalibrated = self.current_task_accuracy(task)
        if self._guard is not None:
            self._guard.unhook()
            self._guard = None
        params = dict(self.model.named_parameters())
        nonzero = sum(int(torch.count_nonzero(p)) for p in self.model.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        self.records.append({
            "task": task.index,
            "accuracy_before_prune": before,
            "accuracy_after_prune": after,
            "drop": {k: before[k] - after[k] for k in before},
            **({"accuracy_after_bn_recalibration": recalibrated,
                "drop_after_bn_recalibration": {k: before[k] - recalibrated[k] for k in before}}
               if recalibrated is not None else {}),
            "density": masks.densities(),
            "density_overall": masks.density(),
            "nonzero": {n: int(torch.count_nonzero(params[n])) for n in self.layer_names},
            "nonzero_fraction_all_parameters": nonzero / total,
            "frozen_fraction": self.ownership.used_fraction() if self.ownership is not None else 0.0,
        })
        super().end_task(task)  # e.g. EWC's Fisher and anchor, on the pruned model

    # ------------------------------------------------------------------ reporting
    def training_densities(self) -> tuple[float, float]:
        """EsaCL trains dense (SPEC): every task's training holds dense weights and gradients; the
        prune at a task's end enters capacity and the exported model only."""
        return 1.0, 1.0

    def stored_masks(self) -> tuple[int, int]:
        """``isolate`` stores the frozen weights' mask; ``expand`` none (the zeros are the mask)."""
        if self.options.isolate and self.masks is not None:
            return 1, self.masks.mask_bytes()
        return 0, 0

    def report(self) -> dict[str, Any]:
        out = super().report()
        o = self.options
        out["esacl"] = {
            "variant": {"sam": o.sam, "polytope": o.polytope, "sse": o.sse, "ere": o.ere, "isolate": o.isolate},
            "sparsity": o.sparsity,
            "keep_frac": o.keep_frac,
            "prune": self.records,
            "polytope": {n: {"k": self.k[n], "radius": self.radius[n]} for n in self.radius},
            "capacity_note": "result.json capacity: eq. 6.24 with the measured nonzero fraction of all parameters "
                             "after the last prune and the masks stored (isolate: 1, expand: 0)",
            "flops_note": "selection pass = forward-only samples, both SAM passes = training samples; layers run "
                          "dense during training (pruned positions are re-initialised), sparse after each prune",
        }
        return out

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["esacl"] = {
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "owner": self.ownership.state_dict() if self.ownership is not None else None,
            "records": self.records,
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        s = state["esacl"]
        if s["masks"] is not None:
            masks = MaskSet(self.model, s["masks"]["masks"])
            masks.load_state_dict(s["masks"])
            self._install(masks)
        if s["owner"] is not None:
            self.ownership.load_state_dict(s["owner"])
        self.records = list(s["records"])


# ---------------------------------------------------------------------- registered variants
@register_method
class EsaCL(EsaCLMixin, ContinualMethod, compile=True):
    """EsaCL on plain fine-tuning (no replay, no regulariser)."""

    name = "esacl"
    description = "EsaCL: SAM + Frank-Wolfe in K-sparse polytopes, one-shot prune per task, loss-based data selection"
    options_cls = EsaCLOptions
    # compile: SAM's two passes go through self.net (the selection pass is forward-only)


@dataclass
class EsaCLEROptions(EsaCLOptions, ReplayOptions):
    pass


@register_method
class EsaCLER(EsaCLMixin, ER, compile=True):
    """EsaCL with experience replay (ER's loss on the selected examples + a buffer minibatch)."""

    name = "esacl-er"
    description = "EsaCL-ER: EsaCL with experience replay"
    options_cls = EsaCLEROptions


@dataclass
class EsaCLDERppOptions(EsaCLOptions, DERppOptions):
    pass


@register_method
class EsaCLDERpp(EsaCLMixin, DERpp, compile=True):
    """EsaCL with DER++ (DER++'s loss on the selected examples + two buffer minibatches)."""

    name = "esacl-der++"
    description = "EsaCL-DER++: EsaCL with DER++ replay"
    options_cls = EsaCLDERppOptions


@dataclass
class EsaCLEWCOptions(EsaCLOptions, EWCOptions):
    pass


@register_method
class EsaCLEWC(EsaCLMixin, OnlineEWC):
    """EsaCL with online EWC (its Fisher and anchor taken on the pruned model after each task)."""

    name = "esacl-ewc"
    description = "EsaCL-EWC: EsaCL with online EWC"
    options_cls = EsaCLEWCOptions
