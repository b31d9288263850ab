"""CPG (``cpg``, Hung, Tu, Wu, Chen, Chan & Chen, "Compacting, Picking and Growing for Unforgetting
Continual Learning", NeurIPS 2019): PackNet-style isolation with a learned *picking* mask over the
frozen weights of earlier tasks and a network that *grows* until a target accuracy is met; Task-IL.

Per task t (``E`` = the run's epochs; validation = ``val_fraction`` of the task's training data,
held out as for scratch, grow and cl-lsg):

1. **pick and train** (the engine's ``E`` epochs): the weights no task owns are trained (SGD,
   ``lr``); every weight owned by tasks < t is frozen bit-exactly and enters the forward pass times
   a binary picking mask, ``mask > threshold`` of a real-valued mask initialised at ``mask_init``
   for every old weight and learned with Adam (``mask_lr``) through a straight-through estimator
   (the official ``Binarizer``; CPG's piggyback masks). The first task has nothing to pick.
2. **grow**: while the task's validation accuracy is below its target and the network has room,
   ``grow_units`` more hidden units per layer are opened (fresh initial weights, free for this
   task, their incoming and outgoing connections included) and the task trains ``E`` more epochs.
3. **compact** (gradual pruning): the weights this task trained are pruned by magnitude to the
   ratios ``prune_step, 2 prune_step, ...`` then ``prune_max`` (0.1 ... 0.9, 0.95 as the official
   scripts), each followed by ``prune_epochs`` epochs at ``prune_lr`` with the picking mask fixed;
   pruning stops at the first ratio whose validation accuracy falls below ``target -
   allow_acc_loss`` and the model rolls back to the last ratio that met it (no pruning at all when
   even the unpruned network misses the target). Pruned weights are zero and free for later tasks.
4. **retrain** (tasks >= 2): ``retrain_epochs`` epochs of weights and picking mask at ``prune_lr``
   and ``retrain_mask_lr`` with the pruned weights held at zero.
5. the kept weights are given to task t (:class:`~sparsecl.sparse.ownership.TaskOwnership`) and its
   binary picking mask is stored; task t's head is frozen whole.

Evaluation of task j uses its own weights, the picked weights of earlier tasks, its head and its
snapshot of the biases (as PackNet); weights of later tasks and unpicked ones are zero.

Target (``target``): ``scratch`` (the default, as the official ``baseline_acc`` files: a network
trained from scratch on the task alone, here the allocated network on the same training part,
scored on the same validation split; cached in the state), one number, or a list per task.

Growth needs room in the allocated tensors: the MLP is built at its widest (``backbone_options:
hidden``) and ``base_units`` hidden units per layer form the first network (the official
``network_width_multiplier`` 1.0); each growth step is the official +0.5 multiplier when
``grow_units = base_units / 2``, up to the allocated width (``max_allowed_network_width_multiplier``).
Model size is reported relative to that base network (``size_total``: open network / base, the
paper's "model size"; ``size_task[j]``: weights task j uses / base). Only the MLP backbone is
supported (units are grown in a plain chain of linear layers, :class:`~sparsecl.sparse.units.UnitChain`).

Differences from the official code, for the 1-epoch-per-task protocols here: a grown network
continues from the narrower one's weights (the official restarts the task's training on the wider
network); each pruning ratio is reached at once at the start of its stage (the official spreads it
over the stage's steps) and the stages are ``prune_epochs`` long (official 20 epochs), the
retraining ``retrain_epochs`` (official 30). Picking is per weight, as the official masks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, Batch, register_method
from sparsecl.methods.cl_lsg import parse_target
from sparsecl.methods.packnet import PackNet, PackNetOptions
from sparsecl.methods.phases import restore_, run_epochs, snapshot, split_accuracy
from sparsecl.methods.scratch import TaskValidation, task_target
from sparsecl.sparse.masks import MaskSet, topk_mask
from sparsecl.sparse.units import UnitChain


@dataclass
class CPGOptions(PackNetOptions):
    lr: float = 0.01  # weights, SGD (the official finetune lr)
    weight_decay: float = 4e-5
    mask_lr: float = 5e-4  # picking mask, Adam
    mask_init: float = 0.01  # the official mask_scale
    threshold: float = 2e-3  # picked where mask > threshold (the official DEFAULT_THRESHOLD)
    base_units: int | None = None  # hidden units per layer of the first network; None = all allocated
    grow_units: int = 0  # hidden units per layer added by one growth step
    target: Any = "scratch"
    allow_acc_loss: float = 0.0
    val_fraction: float = 0.2
    prune_step: float = 0.1
    prune_max: float = 0.95
    prune_epochs: int = 1
    prune_lr: float = 1e-3
    retrain_epochs: int = 1
    retrain_mask_lr: float = 1e-4

    def validate(self) -> None:
        super().validate()
        if self.optimizer != "sgd":
            raise SparseCLError("cpg trains weights with sgd (the picking mask uses adam with mask_lr)")
        if self.keep_fraction is not None:
            raise SparseCLError("cpg prunes by its target accuracy, not by keep_fraction")
        if not (self.mask_lr > 0 and self.prune_lr > 0 and self.retrain_mask_lr >= 0 and self.mask_init > self.threshold):
            raise SparseCLError("cpg needs mask_lr > 0, prune_lr > 0, retrain_mask_lr >= 0 and mask_init > threshold")
        if not 0 < self.prune_step <= self.prune_max < 1:
            raise SparseCLError(f"cpg needs 0 < prune_step <= prune_max < 1, got {self.prune_step}, {self.prune_max}")
        if self.prune_epochs < 1 or self.grow_units < 0 or (self.base_units is not None and self.base_units < 1):
            raise SparseCLError("cpg needs prune_epochs >= 1, grow_units >= 0 and base_units >= 1")
        if not 0 < self.val_fraction < 1:
            raise SparseCLError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        self.target = parse_target(self.target)

    def ratios(self) -> list[float]:
        """The pruning ratios tried in order (0.1, ..., 0.9, 0.95 with the defaults)."""
        out, k = [], 1
        while round(k * self.prune_step, 6) < self.prune_max:
            out.append(round(k * self.prune_step, 6))
            k += 1
        return out + [self.prune_max]


@register_method
class CPG(TaskValidation, PackNet, sparse_kernels=False):
    """Compacting, picking and growing (Task-IL only)."""

    name = "cpg"
    description = "CPG: gradual pruning, learned picking mask over frozen old weights, growth to a target (Task-IL)"
    options_cls = CPGOptions
    # sparse_kernels=False: its forward substitutes picked weights (functional_call), untested on the kernels
    settings = frozenset({TASK_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        o = self.options
        if isinstance(o.target, list) and len(o.target) != ctx.stream.n_tasks:
            raise SparseCLError(f"target lists {len(o.target)} accuracies for {ctx.stream.n_tasks} tasks")
        self.template = copy.deepcopy(model)  # the untrained allocated network (scratch targets)
        self.scratch_generator = torch.Generator()
        self.scratch_generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.chain = UnitChain(model, o.base_units, who="cpg")
        self.base = o.base_units or self.chain.width[0]
        self.params = dict(model.named_parameters())
        self.init_values = {n: self.params[n].detach().clone() for n in self.chain.names + self.chain.head_names}
        self.masks = MaskSet(model, self.chain.structure(), mask_grads=True)
        self.masks.apply_()
        self.picks = {n: torch.zeros_like(self.params[n], requires_grad=True) for n in self.chain.names}
        self.picked: list[dict[str, torch.Tensor]] = []  # binary picking mask of every finished task
        self.targets: list[float] = []
        self.mask_opt: torch.optim.Optimizer | None = None
        self.stats: dict[str, list[Any]] = {k: [] for k in ("target", "accuracy", "grew", "prune_ratio", "picked",
                                                            "size_task", "size_total")}

    # ------------------------------------------------------------------ training
    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.masks.bind_flops(self.ctx.flops)
        with torch.no_grad():
            for p in self.picks.values():
                p.fill_(self.options.mask_init)  # the official re-initialises the piggymask per task
        self.old = {n: self.ownership.owned(n) for n in self.chain.names}
        self._optimizers(self.options.lr, self.options.mask_lr)

    def _optimizers(self, lr: float, mask_lr: float) -> None:
        """Fresh weight (SGD at ``lr``) and mask (Adam at ``mask_lr``, none at 0 or in task 1) optimisers."""
        self._guard.unhook()
        self.masks.unhook()
        self.optimizer = self.make_optimizer()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self._guard.hook_optimizer(self.optimizer)
        self.masks.hook_optimizer(self.optimizer)
        self.mask_opt = torch.optim.Adam(self.picks.values(), lr=mask_lr) if mask_lr > 0 and self.task else None

    def _effective(self) -> dict[str, torch.Tensor]:
        """Backbone weights with the old ones times the binary picking mask (straight-through)."""
        out = {}
        for n in self.chain.names:
            m = self.picks[n]
            binary = m + ((m > self.options.threshold).to(m.dtype) - m).detach()
            out[n] = self.params[n] * torch.where(self.old[n], binary, torch.ones_like(binary))
        return out

    def observe(self, batch: Batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if self.mask_opt is not None:
            self.mask_opt.zero_grad(set_to_none=True)
        logits = functional_call(self.model, self._effective(), (batch.x,)) if self.task else self.model(batch.x)
        loss = self.loss(logits, batch.y, batch.task_id)
        loss.backward()
        self.optimizer.step()
        if self.mask_opt is not None:
            self.mask_opt.step()
        return loss.detach()

    def _accuracy(self, task: Task) -> float:
        """Validation accuracy with the current picking mask (the training forward, eval mode)."""
        with torch.no_grad():
            eff = self._effective() if self.task else {}
            saved = {n: self.params[n].detach().clone() for n in eff}
            for n, w in eff.items():
                self.params[n].copy_(w)
            acc = split_accuracy(self, self.held_out(task)[1], torch.as_tensor(task.classes, device=self.device))
            for n, w in saved.items():
                self.params[n].copy_(w)
        return acc

    def _target(self, task: Task) -> float:
        train, val = self.held_out(task)
        return task_target(self.options.target, self.targets, task, train, val, self.template, self.ctx.augment,
                           epochs=self.ctx.epochs, lr=self.options.lr, batch_size=self.ctx.batch_size,
                           generator=self.scratch_generator, count_samples=self.ctx.count_samples)

    def end_task(self, task: Task) -> None:
        o, t, train = self.options, task.index, self.held_out(task)[0]
        target = self._target(task)
        acc, grew = self._accuracy(task), 0
        while acc < target and self._grow(t):
            grew += 1
            run_epochs(self, train, t, self.ctx.epochs)
            acc = self._accuracy(task)
        ratio = self._compact(task, acc >= target - o.allow_acc_loss, target - o.allow_acc_loss)
        if t and o.retrain_epochs:
            self._optimizers(o.prune_lr, o.retrain_mask_lr)
            run_epochs(self, train, t, o.retrain_epochs)
        self._guard.unhook()
        self.masks.unhook()
        self._finish(task, target, grew, ratio)

    def _own(self, n: str) -> torch.Tensor:
        """Weights this task trains: free and inside the open network."""
        return self.ownership.free(n) & self.chain.structure()[n]

    def _grow(self, t: int) -> bool:
        """Open ``grow_units`` closed units per hidden layer with fresh weights; False if no room."""
        k = self.options.grow_units
        units = [self.chain.closed_units(i, k) for i in range(len(self.chain.width))]
        if not k or any(u.numel() == 0 for u in units):
            return False
        self.chain.grow_(units, t, self.masks, self.init_values)
        return True

    def _compact(self, task: Task, met: bool, floor: float) -> float:
        """Gradual pruning of this task's weights; returns the pruning ratio kept."""
        if not met:
            return 0.0
        o, train = self.options, self.held_out(task)[0]
        kept, state = 0.0, self._snapshot()
        for r in o.ratios():
            self._prune(r)
            self._optimizers(o.prune_lr, 0.0)
            run_epochs(self, train, task.index, o.prune_epochs)
            if self._accuracy(task) < floor:
                break
            kept, state = r, self._snapshot()
        self._restore(state)
        return kept

    @torch.no_grad()
    def _prune(self, ratio: float) -> None:
        """Keep the largest ``1 - ratio`` of this task's weights per layer (of those unpruned at 0)."""
        for n in self.chain.names:
            own = self._own(n)
            k = round((1 - ratio) * int(own.sum()))
            keep = topk_mask(self.params[n].abs().masked_fill(~own, -1.0), k)
            self.masks.set_mask(n, self.chain.structure()[n] & (keep | ~own))
        self.masks.apply_()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return snapshot(self.params, self.masks, self.picks)

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        restore_(state, self.params, self.masks, self.picks)

    @torch.no_grad()
    def _finish(self, task: Task, target: float, grew: int, ratio: float) -> None:
        t = task.index
        keep = {n: self._own(n) & self.masks.masks[n] for n in self.chain.names}
        self.ownership.assign_all_(keep, t)
        self.picked.append({n: self.old[n] & (self.picks[n] > self.options.threshold) for n in self.chain.names})
        for n in self.chain.names:  # pruned weights become free again, and usable: zero, unmasked
            self.masks.set_mask(n, self.chain.structure()[n])
        self.snapshots.append({n: v.detach().clone() for n, v in self._shared_state().items()})
        old = sum(int(self.old[n].sum()) for n in self.chain.names)
        picked = sum(int(self.picked[t][n].sum()) for n in self.chain.names)
        st = self.stats
        st["target"].append(round(target, 4))
        st["accuracy"].append(round(self._accuracy(task), 4))
        st["grew"].append(grew)
        st["prune_ratio"].append(ratio)
        st["picked"].append(picked / old if old else None)
        st["size_task"].append(sum(int(self._uses(t)[n].sum()) for n in self.chain.names) / self.chain.base_weights(self.base))
        st["size_total"].append(self.chain.backbone_weights() / self.chain.base_weights(self.base))

    def _uses(self, j: int) -> dict[str, torch.Tensor]:
        """Weights task j computes with: its own and the old ones it picked."""
        return {n: self.ownership.owned(n, j) | self.picked[j][n] for n in self.chain.names}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _use_task(self, j: int) -> None:
        super()._use_task(j)
        if j < len(self.picked):
            for n, use in self._uses(j).items():
                self.params[n].copy_(self._saved[n] * use)

    def stored_masks(self) -> tuple[int, int]:
        """Ownership (one bitmask per task) and one picking bitmask per task after the first."""
        n = self.ownership.n_tasks
        per_task = self.ownership.task_mask_bytes() // max(n, 1)
        return 2 * n - 1 if n else 0, (2 * n - 1) * per_task if n else 0

    def report(self) -> dict[str, Any]:
        return {**{k: list(v) for k, v in self.stats.items()},
                "model_size": self.stats["size_total"][-1] if self.stats["size_total"] else 1.0,
                "size_unit": f"base MLP ({self.base} units per hidden layer, conv/linear weights of the backbone)",
                "open_units": [int(self.chain.open(i).sum()) for i in range(len(self.chain.width))],
                "decided_on": f"validation ({self.options.val_fraction:g} of each task's training data)"}

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({"picked": self.picked, "stamp": self.chain.stamp, "masks": self.masks.state_dict(),
                      "targets": torch.tensor(self.targets, dtype=torch.float64),
                      "scratch_generator": self.scratch_generator.get_state(), "stats": dict(self.stats)})
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.picked = [{n: v.to(self.device) for n, v in p.items()} for p in state["picked"]]
        self.chain.stamp = [s.to(self.device) for s in state["stamp"]]
        self.masks.load_state_dict(state["masks"])
        self.targets = [float(v) for v in state["targets"]]
        self.scratch_generator.set_state(state["scratch_generator"])
        self.stats = {k: list(v) for k, v in state["stats"].items()}
