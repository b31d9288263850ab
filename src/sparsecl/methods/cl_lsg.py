"""CL-LSG (``cl-lsg``, Yang, Lin, Zhang & Fan, NeurIPS 2022): continual learning by learnable
sparse growth from a compact seed network; Task-IL with per-task heads.

The weight tensors have the full network's size; which of them a task uses is decided by gates
(:mod:`sparsecl.sparse.gates`) on every conv/linear weight of the backbone (stem and shortcuts
included; the per-task heads are dense):

- grown-mask m^g: one continuous-sparsification gate per output channel (sigmoid(beta*s),
  beta annealed from 1 to ``beta_max`` over the growth stage, binarised at its end, penalty
  ``lam * sum(gates)``). The seed network is the first ``seed_fraction`` (1/8) of each layer's
  output channels, open from the start. Open channels stay open for all later tasks.
- attentive-mask m^a: kernel-wise Gumbel-sigmoid gates (hard 0.5 threshold, straight-through) on
  the weights the task trains (free weights: the seed in task 1, grown channels, released weights).
- selective-mask m^s: kernel-wise Gumbel-sigmoid gates on the frozen weights of earlier tasks,
  learned per task (the weights themselves stay bit-identical, :class:`FrozenGuard`).
- released weights: weights of open channels that no task uses (attentive gate 0 when their task
  ended) stay free in :class:`TaskOwnership`; a later task retrains them (``retrain_released``).

Per task t (``E`` = the run's epochs):

1. stage 1, pick and reuse (tasks >= 2): ``stage1_epochs = clamp(round(stage1_fraction * E), 1,
   E - 1)`` epochs with the selective mask on frozen weights and the attentive mask + SGD on the
   released weights, no growth. Then the task's Task-IL accuracy (on its ``decide_on`` split,
   'test' as the paper compares with scratch test accuracy) is compared with its target.
2. stage 2, learnable sparse growth, only if that accuracy is below the target: the remaining
   epochs continue stage 1 and also learn grown-masks on the closed channels and attentive masks
   on the kernels of grown channels. If the target is met, the remaining epochs are skipped.
   Task 1 is all growth (nothing to reuse); ``growth: always`` makes every task one joint stage
   (the paper's "grow only" and ablation rows), ``growth: never`` never grows.

At the end of task t its *in-use* kernels are those whose gate is 1 and whose output and input
channels are both open; the free ones among them are given to task t (ownership) and frozen.
Evaluation of task j uses exactly task j's in-use kernels, channels, head and its snapshot of the
small shared tensors (biases, BatchNorm affine and statistics), as PackNet does.

Target (``target``): ``scratch`` trains a separate full model per task (:func:`scratch_accuracy`,
same epochs, lr and batch size) and caches its accuracy in the method state; or one number for all
tasks, or a list with one number per task (percent).

Model size (``report()``): ``size_task[j]`` = weights in use by task j / weights of the full
backbone (conv + linear weights; heads, biases and BN excluded, identical for every method);
``size_total[t]`` = weights in use by any task after task t (the paper's Table 3 "model size").

Ablations (paper Table 8) as options: ``selective`` (off = reuse earlier weights whole),
``attentive`` (off = grow whole channels, no kernel sparsity), ``retrain_released``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, Batch, ContinualMethod, MethodOptions, TaskSubnetworks, register_method
from sparsecl.methods.scratch import scratch_accuracy, task_il_accuracy
from sparsecl.sparse.gates import GateSet
from sparsecl.sparse.ownership import FrozenGuard, TaskOwnership
from sparsecl.sparse.policy import MaskPolicy

GROWTH = ("target", "always", "never")


def parse_target(value: Any) -> str | float | list[float]:
    """``'scratch'``, one number, or a list of numbers (YAML list or comma-separated string)."""
    if isinstance(value, str):
        if value.strip().lower() == "scratch":
            return "scratch"
        parts = [p for p in value.replace("[", "").replace("]", "").split(",") if p.strip()]
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise SparseCLError(f"target must be 'scratch', a number or a list of numbers, got {value!r}") from None
        value = nums[0] if len(nums) == 1 else nums
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value <= 100:
            raise SparseCLError(f"target accuracy must be in [0, 100] percent, got {value}")
        return float(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return [float(parse_target(v)) for v in value]
    raise SparseCLError(f"target must be 'scratch', a number or a list of numbers, got {value!r}")


@dataclass
class CLLSGOptions(MethodOptions):
    lr: float = 0.01  # weights: SGD
    mask_lr: float = 5e-4  # gates: Adam
    lam: float = 1e-4  # L0 surrogate on the grown-mask
    seed_fraction: float = 0.125
    stage1_fraction: float = 0.5  # share of the epochs of tasks >= 2 spent in stage 1
    target: Any = "scratch"
    decide_on: str = "test"  # split on which stage-1 accuracy is compared with the target
    growth: str = "target"  # target | always | never
    selective: bool = True
    attentive: bool = True
    retrain_released: bool = True
    beta_max: float = 200.0
    temperature: float = 1.0
    kernel_init: float = 3.0  # initial logit of learnable kernel gates (open)
    grow_init: float = 0.0  # initial s of growing channels

    def validate(self) -> None:
        super().validate()
        if self.optimizer != "sgd":
            raise SparseCLError("cl-lsg trains weights with sgd (masks use adam with mask_lr)")
        if not self.mask_lr > 0 or self.lam < 0:
            raise SparseCLError(f"mask_lr must be > 0 and lam >= 0, got {self.mask_lr} and {self.lam}")
        if not 0 < self.seed_fraction <= 1:
            raise SparseCLError(f"seed_fraction must be in (0, 1], got {self.seed_fraction}")
        if not 0 < self.stage1_fraction < 1:
            raise SparseCLError(f"stage1_fraction must be in (0, 1), got {self.stage1_fraction}")
        if self.decide_on not in ("test", "train"):
            raise SparseCLError(f"decide_on must be test or train, got {self.decide_on!r}")
        if self.growth not in GROWTH:
            raise SparseCLError(f"unknown growth {self.growth!r} (known: {', '.join(GROWTH)})")
        if not self.beta_max >= 1 or not self.temperature > 0:
            raise SparseCLError(f"beta_max must be >= 1 and temperature > 0, got {self.beta_max}, {self.temperature}")
        self.target = parse_target(self.target)


@register_method
class CLLSG(TaskSubnetworks, ContinualMethod):
    """Seed network + per-task pick-and-reuse and learnable sparse growth (Task-IL only)."""

    name = "cl-lsg"
    description = "CL-LSG: grow a 1/8 seed net with learnable channel + kernel masks, reuse/release (Task-IL)"
    options_cls = CLLSGOptions
    settings = frozenset({TASK_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        heads = getattr(model.head, "heads", None)
        if heads is None:
            raise SparseCLError(f"{self.name} needs per-task heads (run it with --setting task-il)")
        o = self.opt
        if ctx.epochs < 2 and o.growth == "target":
            raise SparseCLError(f"{self.name} needs >= 2 epochs per task for its two stages (or growth: always)")
        T = ctx.stream.n_tasks
        if isinstance(o.target, list) and len(o.target) != T:
            raise SparseCLError(f"target lists {len(o.target)} accuracies for {T} tasks")
        self.template = copy.deepcopy(model)  # the untrained full network (scratch targets)
        names = MaskPolicy("conv-linear", include_first=True, include_shortcuts=True).select(model)
        self.mask_policy = "conv-linear+first+shortcuts (channel + kernel gates)"
        self.ownership = TaskOwnership(model, names)
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,))))  # from the run's seed
        self.scratch_generator = torch.Generator()
        self.scratch_generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.gates = GateSet(model, names, self.generator, temperature=o.temperature,
                             kernel_init=o.kernel_init, channel_init=o.grow_init)
        for g in self.gates.groups:  # the seed network: the first 1/8 of each layer's channels
            on = self.gates.channel_gate(g).on
            on[: max(1, math.ceil(on.numel() * o.seed_fraction))] = True
        params = dict(model.named_parameters())
        self.head_params = {t: [f"head.heads.{t}.{n}" for n, _ in h.named_parameters()] for t, h in enumerate(heads)}
        head_names = {n for ns in self.head_params.values() for n in ns}
        self.shared_names = [n for n in params if n not in set(names) and n not in head_names]
        self.shared_names += [n for n, _ in model.named_buffers()]
        self.total_weights = sum(params[n].numel() for n in names)
        self.kernel_numel = {n: params[n][0, 0].numel() for n in names}
        # Per finished task: in-use kernels, open channels, shared-tensor snapshot, bookkeeping.
        self.use: list[dict[str, torch.Tensor]] = []
        self.channels: list[dict[str, torch.Tensor]] = []
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.targets: list[float] = []
        self.stage1_acc: list[float] = []  # NaN where there was no stage-1 decision
        self.grew: list[int] = []
        self.size_task: list[float] = []
        self.size_total: list[float] = []
        self._guard: FrozenGuard | None = None
        self.mask_optimizer: torch.optim.Optimizer | None = None
        self._saved: dict[str, torch.Tensor] | None = None
        self._view: int | None = None

    # ------------------------------------------------------------------ stages
    def _plan(self, t: int) -> int:
        """Stage-1 epochs of task ``t`` (0 = one growth stage from the start)."""
        E = self.ctx.epochs
        if self.opt.growth == "never":
            return E
        if t == 0 or self.opt.growth == "always":
            return 0
        return min(max(round(self.opt.stage1_fraction * E), 1), E - 1)

    def _target(self, task: Task) -> float:
        o = self.opt
        if isinstance(o.target, float):
            return o.target
        if isinstance(o.target, list):
            return o.target[task.index]
        if len(self.targets) <= task.index:  # cached in the method state (survives --resume)
            acc = scratch_accuracy(self.template, task, self.ctx.augment, epochs=self.ctx.epochs, lr=o.lr,
                                   batch_size=self.ctx.batch_size, generator=self.scratch_generator,
                                   split=o.decide_on, count_samples=self.ctx.count_samples)
            self.targets.append(acc)
        return self.targets[task.index]

    @torch.no_grad()
    def _configure_kernels(self, t: int) -> None:
        """Which kernels learn a selective / attentive gate in task ``t``, which are fixed 0/1."""
        o = self.opt
        on = self.gates.channels_on()
        for n in self.ownership.names:
            gate = self.gates.kernel_gate(n)
            alive = self.gates.alive(n, on)  # kernels of the network before this task
            owned = self.ownership.owned(n)
            frozen = owned.reshape(*owned.shape[:2], -1).any(-1).reshape(alive.shape)
            released = alive & ~frozen  # free weights of open channels (task 1: the seed)
            learn = torch.zeros_like(alive)
            value = torch.ones(alive.shape, device=alive.device)
            if o.selective:
                learn |= frozen
            if t > 0 and not o.retrain_released:
                value[released] = 0.0
            elif o.attentive:
                learn |= released
            if o.attentive:
                learn |= ~alive  # kernels that only exist once channels grow
            gate.configure_(learn, value)

    def begin_task(self, task: Task) -> None:
        t = task.index
        super().begin_task(task)  # SGD on the weights, re-created per task
        frozen = self.ownership.frozen_masks(t)
        params = dict(self.model.named_parameters())
        for j in range(t):
            for n in self.head_params[j]:
                frozen[n] = torch.ones_like(params[n], dtype=torch.bool)
        self._guard = FrozenGuard(self.model, frozen)
        self._guard.hook_optimizer(self.optimizer)
        # the target is only needed (and scratch models only trained) when growth depends on it
        self._target_acc = self._target(task) if self.opt.growth == "target" else float("nan")
        self._stage1_epochs = self._plan(t)
        self._skip_from: int | None = None
        self._decision = float("nan")
        self._grew = False
        self._configure_kernels(t)
        for g in self.gates.groups:
            self.gates.channel_gate(g).learn.zero_()
        self.gates.train(True)
        self._step = 0
        steps = math.ceil(len(self.train_split(task)) / self.ctx.batch_size)
        self._growth_steps = max(1, (self.ctx.epochs - self._stage1_epochs) * steps)
        self.gates.set_beta(1.0)
        if self._stage1_epochs == 0:
            self._start_growth()
        self.mask_optimizer = torch.optim.Adam(list(self.gates.parameters()), lr=self.opt.mask_lr)

    def _start_growth(self) -> None:
        for g in self.gates.groups:
            self.gates.channel_gate(g).start_growth_()
        self.mask_optimizer = torch.optim.Adam(list(self.gates.parameters()), lr=self.opt.mask_lr)
        self._grew = True
        self._step = 0

    def epoch_indices(self, task: Task, epoch: int) -> torch.Tensor | None:
        if self._skip_from is not None and epoch >= self._skip_from:  # target met: no growth
            return torch.empty(0, dtype=torch.long, device=self.device)
        return None

    def observe(self, batch: Batch) -> torch.Tensor:
        if self._grew:  # anneal beta geometrically from 1 to beta_max over the growth stage
            self.gates.set_beta(self.opt.beta_max ** min(self._step / self._growth_steps, 1.0))
            self._step += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.mask_optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(batch.x), batch.y, batch.task_id)
        if self._grew and self.opt.lam > 0:
            loss = loss + self.opt.lam * self.gates.penalty()
        loss.backward()
        self.optimizer.step()
        self.mask_optimizer.step()
        return loss.detach()

    def current_accuracy(self, task: Task) -> float:
        """Task-IL accuracy of the network as it is now (deterministic gates, BN in eval mode)."""
        split = task.test if self.opt.decide_on == "test" else task.train
        was = self.model.training
        self.model.eval()
        self.gates.train(False)
        classes = torch.as_tensor(task.classes, device=self.device)
        try:
            return task_il_accuracy(self.model, split, classes, self.ctx.augment)
        finally:
            self.model.train(was)
            self.gates.train(True)

    def end_epoch(self, task: Task, epoch: int) -> None:
        if task.index == 0 or self.opt.growth != "target" or epoch != self._stage1_epochs - 1:
            return
        self._decision = self.current_accuracy(task)
        if self._decision < self._target_acc:
            self._start_growth()
        else:
            self._skip_from = epoch + 1

    @torch.no_grad()
    def end_task(self, task: Task) -> None:
        t = task.index
        for g in self.gates.groups:
            self.gates.channel_gate(g).binarise_()
        on = self.gates.channels_on()
        use: dict[str, torch.Tensor] = {}
        params = dict(self.model.named_parameters())
        for n in self.ownership.names:
            use[n] = self.gates.kernel_gate(n).hard() & self.gates.alive(n, on)
            mine = use[n].expand_as(params[n]) & self.ownership.free(n)
            self.ownership.assign_(n, mine, t)
        self._guard.unhook()
        self.use.append(use)
        self.channels.append(on)
        self.snapshots.append({n: v.detach().clone() for n, v in self._shared_state().items()})
        self.stage1_acc.append(self._decision)
        self.grew.append(int(self._grew))
        in_use = sum(int(u.sum()) * self.kernel_numel[n] for n, u in use.items())
        self.size_task.append(in_use / self.total_weights)
        self.size_total.append(self.ownership.used_fraction())

    # ---------------------------------------------------------------- evaluation
    def _gate_buffers(self) -> dict[str, torch.Tensor]:
        out = {f"c.{k}": v for k, v in self.gates.channel.state_dict(keep_vars=True).items() if not k.endswith(".s")}
        out.update({f"k.{k}": v for k, v in self.gates.kernel.state_dict(keep_vars=True).items()
                    if not k.endswith(".logit")})
        return out

    def _view_tensors(self) -> dict[str, torch.Tensor]:
        return {**self._shared_state(), **self._gate_buffers()}

    def _views_active(self, active: bool) -> None:
        self.gates.train(not active)

    @torch.no_grad()
    def _use_task(self, j: int) -> None:
        """Task j's in-use kernels and channels (fixed gates) and its shared tensors."""
        if j < len(self.use):
            for g in self.gates.groups:
                gate = self.gates.channel_gate(g)
                gate.on.copy_(self.channels[j][g])
                gate.learn.zero_()
            for n in self.ownership.names:
                gate = self.gates.kernel_gate(n)
                gate.learn.zero_()
                gate.value.copy_(self.use[j][n])
            shared = self.snapshots[j]
        else:  # a task not trained yet: the network as it is now
            for k, v in self._gate_buffers().items():
                v.copy_(self._saved[k])
            shared = self._saved
        state = self._shared_state()
        for n in self.shared_names:
            state[n].copy_(shared[n])
        self._view = j

    def _view_state(self) -> dict[str, torch.Tensor]:
        """The loaded task's state with its fixed gates baked into the weights (for the export)."""
        return self.gates.bake(super()._view_state())

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        nan = lambda v: None if v != v else round(v, 2)  # noqa: E731  (JSON has no NaN)
        grown = [sum(int(c[g].sum()) for g in c) for c in self.channels]
        return {
            "size_task": [round(s, 6) for s in self.size_task],
            "size_total": [round(s, 6) for s in self.size_total],
            "model_size": round(self.size_total[-1], 6) if self.size_total else 0.0,
            "size_unit": "full backbone (conv/linear weights)",
            "grew": self.grew,
            "target": [nan(v) for v in self.targets] if self.targets else self.opt.target,
            "stage1_accuracy": [nan(v) for v in self.stage1_acc],
            "open_channels": grown,
            "total_channels": sum(self.gates.channel_gate(g).on.numel() for g in self.gates.groups),
        }

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "ownership": self.ownership.state_dict(),
            "gates_channel": self.gates.channel.state_dict(),
            "gates_kernel": self.gates.kernel.state_dict(),
            "generator": self.generator.get_state(),
            "scratch_generator": self.scratch_generator.get_state(),
            "use": self.use, "channels": self.channels, "snapshots": self.snapshots,
            "targets": torch.tensor(self.targets, dtype=torch.float64),
            "stage1_acc": torch.tensor(self.stage1_acc, dtype=torch.float64),
            "grew": self.grew, "size_task": self.size_task, "size_total": self.size_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.device
        self.ownership.load_state_dict(state["ownership"])
        self.gates.channel.load_state_dict(state["gates_channel"])
        self.gates.kernel.load_state_dict(state["gates_kernel"])
        self.generator.set_state(state["generator"])
        self.scratch_generator.set_state(state["scratch_generator"])
        self.use = [{n: v.to(dev) for n, v in u.items()} for u in state["use"]]
        self.channels = [{n: v.to(dev) for n, v in c.items()} for c in state["channels"]]
        self.snapshots = [{n: v.to(dev) for n, v in s.items()} for s in state["snapshots"]]
        self.targets = [float(v) for v in state["targets"]]
        self.stage1_acc = [float(v) for v in state["stage1_acc"]]
        self.grew = [int(v) for v in state["grew"]]
        self.size_task = [float(v) for v in state["size_task"]]
        self.size_total = [float(v) for v in state["size_total"]]
