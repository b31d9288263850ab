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

Gates that can decide within a task (SPEC "CL-LSG"). Adam moves a parameter by about its
learning rate per step, so at the paper's mask lr 5e-4 a plain logit starting open at 3 would need
> 6,000 steps to reach the threshold 0, more than any task here has. The kernel gates' logit is
therefore ``scale * score`` (:class:`~sparsecl.sparse.gates.KernelGate`) with the scale set per
task so that a gate moving at Adam's full step crosses from ``kernel_init`` (3: open with
probability 0.95 under the Gumbel noise) to 0 in ``gate_reach`` (1/4) of the first stage's steps
(:func:`~sparsecl.sparse.gates.reach_scale`). The initial logit stays well inside "open" (a gate
started near 0 would be a coin flip every step, i.e. heavy dropout on the reused weights), and
the temperature is no lever (the sampled hard mask does not depend on it and Adam normalises its
gradient factor away). Channel gates start at the threshold (``s = 0``) and are decided by the
sign of ``s`` at the end, which any movement sets; ``beta`` (up to 200) makes a few hundred
steps' movement saturate the soft gate.

Per task t (``E`` = the run's epochs). Every task holds out ``val_fraction`` of its training
examples (:class:`~sparsecl.methods.scratch.TaskValidation`, the same split for scratch, grow and
cl-lsg; the paper uses 4000/1000/1000 train/validation/test): the engine trains on the rest, the
target and the grow decision are measured on the held-out part, never on the test split.

1. stage 1, pick and reuse (tasks >= 2): ``stage1_epochs`` (default ``E``) epochs with the
   selective mask on frozen weights and the attentive mask + SGD on the released weights, no
   growth. Then the task's Task-IL validation accuracy is compared with its target.
2. stage 2, learnable sparse growth, only if that accuracy is below the target: ``E`` more epochs
   that continue stage 1 (same kernel gates, same Adam state) and also learn grown-masks on the
   closed channels and attentive masks on the kernels of grown channels. If the target is met,
   there is no stage 2. The engine runs ``E`` epochs per task, so an engine epoch may carry several
   passes over the data (:meth:`CLLSG._schedule`). Task 1 is one growth stage of ``E`` epochs;
   ``growth: always`` makes every task one joint stage of ``E`` epochs (the paper's "grow only"
   and the ablation rows), ``growth: never`` never grows.

At the end of task t its *in-use* kernels are those whose gate is 1 and whose output and input
channels are both open; the free ones among them are given to task t (ownership) and frozen.
Evaluation of task j uses exactly task j's in-use kernels, channels, head and its snapshot of the
small shared tensors (biases, BatchNorm affine and statistics), as PackNet does.

Target (``target``): ``scratch`` trains a separate full model per task on the same training part
(:func:`scratch_accuracy`, same epochs, lr and batch size), scores it on the same validation split
and caches it in the method state; or one number for all tasks, or a list with one per task (%).

Report (``report()``, per task): ``size_task[j]`` = weights in use by task j / weights of the full
backbone (conv + linear weights; heads, biases and BN excluded, identical for every method);
``size_total[t]`` = weights in use by any task after task t (the paper's Table 3 "model size");
``growth_stage`` (stage 2 or a growth stage ran), ``grew`` (at least one channel was kept),
``grown_kept`` (kept / growable channels), and over the kernels of the network before the task:
``selected`` (share of earlier tasks' frozen kernels the selective mask keeps), ``released``
(share of old kernels that are released, i.e. free for this task to retrain) and ``released_kept``
(share of those this task keeps); ``stage1_accuracy`` (validation) and ``target``.

Model size past the full network (``max_width``, default 1.5; the paper reaches 1.5x): the engine
allocates every gated layer at ``max_width`` times its designed width
(:func:`~sparsecl.sparse.capacity.widen_`; the designed network keeps its exact initial weights),
the full network is the starting capacity, and a channel group's reserve channels become growable
only once all its designed channels are open. Until then its layers compute their designed
channels only: each forward and backward is bit for bit that of ``max_width: 1``, and so are the
FLOPs (the counter is told the computed share, :meth:`~sparsecl.sparse.gates.GateSet.densities`).
The optimisers' elementwise updates over the wider tensors can round a few entries differently
(which entries fall to a vectorised or a scalar loop depends on the tensor's size), so over
thousands of steps such a run drifts from ``max_width: 1`` at float-rounding level.
Model size stays relative to the designed (full) network, so it can exceed 1.

Ablations (paper Table 8) as options: ``selective`` (off = reuse earlier weights whole),
``attentive`` (off = grow whole channels, no kernel sparsity), ``retrain_released``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, Batch, ContinualMethod, MethodOptions, TaskSubnetworks, register_method
from sparsecl.methods.scratch import TaskValidation, task_il_accuracy, task_target
from sparsecl.sparse.capacity import backbone_weights, narrow
from sparsecl.sparse.gates import GateSet, reach_scale
from sparsecl.sparse.ownership import FrozenGuard, TaskOwnership

GROWTH = ("target", "always", "never")
# Per-task entries of report() (and the checkpoint), in the order the docs explain them.
STATS = ("stage1_accuracy", "growth_stage", "grew", "channels_kept", "grown_kept", "selected", "released",
         "released_kept", "kernel_logit_scale", "size_task", "size_total")


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
    stage1_epochs: int | None = None  # epochs of stage 1 (pick and reuse); None = the task's epochs
    target: Any = "scratch"
    val_fraction: float = 0.2  # of each task's training data held out for target and decision
    growth: str = "target"  # target | always | never
    selective: bool = True
    attentive: bool = True
    retrain_released: bool = True
    beta_max: float = 200.0
    temperature: float = 1.0
    kernel_init: float = 3.0  # initial logit of learnable kernel gates (open w.p. sigmoid(3) = 0.95)
    gate_reach: float = 0.25  # a kernel gate can cross from kernel_init to 0 in this share of a stage
    grow_init: float = 0.0  # initial s of growing channels (at the threshold)
    max_width: float = 1.5  # allocated channels per layer / designed (reserve grows past 1x)

    @property
    def model_width(self) -> float:
        return self.max_width

    def validate(self) -> None:
        super().validate()
        if self.optimizer != "sgd":
            raise SparseCLError("cl-lsg trains weights with sgd (masks use adam with mask_lr)")
        if not self.mask_lr > 0 or self.lam < 0:
            raise SparseCLError(f"mask_lr must be > 0 and lam >= 0, got {self.mask_lr} and {self.lam}")
        if not 0 < self.seed_fraction <= 1:
            raise SparseCLError(f"seed_fraction must be in (0, 1], got {self.seed_fraction}")
        if self.stage1_epochs is not None and (not isinstance(self.stage1_epochs, int) or self.stage1_epochs < 1):
            raise SparseCLError(f"stage1_epochs must be a positive integer, got {self.stage1_epochs!r}")
        if not 0 < self.val_fraction < 1:
            raise SparseCLError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.gate_reach <= 1:
            raise SparseCLError(f"gate_reach must be in (0, 1], got {self.gate_reach}")
        if self.growth not in GROWTH:
            raise SparseCLError(f"unknown growth {self.growth!r} (known: {', '.join(GROWTH)})")
        if not self.max_width >= 1:
            raise SparseCLError(f"max_width must be >= 1 (the designed network is the starting capacity), "
                                f"got {self.max_width}")
        if not self.beta_max >= 1 or not self.temperature > 0:
            raise SparseCLError(f"beta_max must be >= 1 and temperature > 0, got {self.beta_max}, {self.temperature}")
        self.target = parse_target(self.target)


def spread(passes: int, slots: int) -> list[int]:
    """``passes`` data passes over ``slots`` engine epochs, as evenly as possible, front-loaded."""
    base, extra = divmod(passes, slots)
    return [base + 1] * extra + [base] * (slots - extra)


# Stages of an engine epoch: one growth stage from the start (task 1, growth: always), stage 1
# (pick and reuse), stage 2 (growth, only if stage 1 missed the target).
GROW_ONLY, REUSE, GROW = 0, 1, 2


@register_method
class CLLSG(TaskValidation, TaskSubnetworks, ContinualMethod):
    """Seed network + per-task pick-and-reuse and learnable sparse growth (Task-IL only)."""

    name = "cl-lsg"
    description = "CL-LSG: grow a 1/8 seed net with learnable channel + kernel masks, reuse/release (Task-IL)"
    options_cls = CLLSGOptions
    settings = frozenset({TASK_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        o = self.options
        if ctx.epochs < 2 and o.growth == "target":
            raise SparseCLError(f"{self.name} needs >= 2 epochs per task for its two stages (or growth: always)")
        if o.stage1_epochs is not None and o.stage1_epochs > ctx.epochs:
            raise SparseCLError(f"stage1_epochs ({o.stage1_epochs}) can only shorten stage 1 "
                                f"(at most the {ctx.epochs} epochs per task)")
        T = ctx.stream.n_tasks
        if isinstance(o.target, list) and len(o.target) != T:
            raise SparseCLError(f"target lists {len(o.target)} accuracies for {T} tasks")
        self.template = narrow(model)  # the untrained full network (scratch targets, model size)
        names = backbone_weights(model)
        self.mask_scope = "conv-linear+first+shortcuts (channel + kernel gates)"
        self.ownership = TaskOwnership(model, names)
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,))))  # from the run's seed
        self.scratch_generator = torch.Generator()
        self.scratch_generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.gates = GateSet(model, names, self.generator, temperature=o.temperature,
                             kernel_init=o.kernel_init, channel_init=o.grow_init, designed=model.allocation)
        for g in self.gates.groups:  # the seed network: the first 1/8 of each layer's designed channels
            self.gates.channel_gate(g).on[: max(1, math.ceil(self.gates.designed[g] * o.seed_fraction))] = True
        self._gates_changed()
        params = dict(model.named_parameters())
        self.split_task_heads(model, names)
        full = dict(self.template.named_parameters())
        self.total_weights = sum(full[n].numel() for n in names)
        self.kernel_numel = {n: params[n][0, 0].numel() for n in names}
        # Per finished task: in-use kernels, open channels, shared-tensor snapshot, bookkeeping.
        self.use: list[dict[str, torch.Tensor]] = []
        self.channels: list[dict[str, torch.Tensor]] = []
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.targets: list[float] = []
        self.stats: dict[str, list[float]] = {k: [] for k in STATS}
        self._guard: FrozenGuard | None = None
        self.mask_optimizer: torch.optim.Optimizer | None = None
        self.channel_optimizer: torch.optim.Optimizer | None = None
        self._saved: dict[str, torch.Tensor] | None = None
        self._view: int | None = None

    # ------------------------------------------------------------------ stages
    def _schedule(self, t: int) -> list[tuple[int, int]]:
        """``(stage, data passes)`` of each engine epoch of task ``t``.

        Each stage trains for the task's epochs ``E`` (stage 1: ``stage1_epochs``), so a task that
        grows after stage 1 makes ``stage1_epochs + E`` passes over its data in the engine's ``E``
        epochs: an engine epoch carries several passes (:meth:`epoch_indices` repeats the examples)
        and the decision falls on the boundary of two engine epochs."""
        E = self.ctx.epochs
        s1 = self.options.stage1_epochs or E
        if self.options.growth == "never":
            return [(REUSE, p) for p in spread(s1, E)]
        if t == 0 or self.options.growth == "always":
            return [(GROW_ONLY, 1)] * E
        a = min(max(round(E * s1 / (s1 + E)), 1), E - 1)  # engine epochs of stage 1
        return [(REUSE, p) for p in spread(s1, a)] + [(GROW, p) for p in spread(E, E - a)]

    def _steps(self, passes: int, n: int) -> int:
        return math.ceil(passes * n / self.ctx.batch_size)

    def _target(self, task: Task) -> float:
        train, val = self.held_out(task)
        return task_target(self.options.target, self.targets, task, train, val, self.template, self.ctx.augment,
                           epochs=self.ctx.epochs, lr=self.options.lr, batch_size=self.ctx.batch_size,
                           generator=self.scratch_generator, count_samples=self.ctx.count_samples)

    @torch.no_grad()
    def _configure_kernels(self, t: int, scale: float) -> None:
        """Which kernels learn a selective / attentive gate in task ``t``, which are fixed 0/1;
        remembers the old kernels (those of the network before this task) for the statistics."""
        o = self.options
        on = self.gates.channels_on()
        self._frozen, self._released, self._alive = {}, {}, {}
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
            gate.configure_(learn, value, scale)
            self._frozen[n], self._released[n], self._alive[n] = frozen & alive, released, alive

    def begin_task(self, task: Task) -> None:
        t = task.index
        super().begin_task(task)  # SGD on the weights, re-created per task
        self._guard = FrozenGuard(self.model, {**self.ownership.frozen_masks(t), **self.frozen_heads(t)})
        self._guard.hook_optimizer(self.optimizer)
        # the target is only needed (and scratch models only trained) when growth depends on it
        self._target_acc = self._target(task) if self.options.growth == "target" else float("nan")
        n = len(self.train_split(task))
        self._plan = self._schedule(t)
        first = sum(self._steps(p, n) for s, p in self._plan if s == self._plan[0][0])
        self._scale = reach_scale(self.options.kernel_init, self.options.mask_lr, round(self.options.gate_reach * first))
        self._growth_steps = max(1, sum(self._steps(p, n) for s, p in self._plan if s != REUSE))
        self._skip_growth = False
        self._decision = float("nan")
        self._growing: dict[str, torch.Tensor] | None = None
        self._configure_kernels(t, self._scale)
        for g in self.gates.groups:
            self.gates.channel_gate(g).learn.zero_()
        self.gates.train(True)
        self.gates.set_beta(1.0)
        # one Adam for the kernel gates over the whole task (never reset between the stages);
        # the channel gates get theirs when growth starts (they do not learn before)
        self.mask_optimizer = torch.optim.Adam(list(self.gates.kernel.parameters()), lr=self.options.mask_lr)
        self.channel_optimizer = None
        if self._plan[0][0] == GROW_ONLY:
            self._start_growth()  # tells the gates' change itself
        else:
            self._gates_changed()

    def _start_growth(self) -> None:
        for g in self.gates.groups:  # the reserve only once the designed channels are all open
            gate, d = self.gates.channel_gate(g), self.gates.designed[g]
            allowed = torch.arange(gate.on.numel(), device=gate.on.device) < d
            gate.start_growth_(allowed | bool(gate.on[:d].all()))
        self._growing = {g: self.gates.channel_gate(g).learn.clone() for g in self.gates.groups}
        self._gates_changed()
        self.channel_optimizer = torch.optim.Adam(list(self.gates.channel.parameters()), lr=self.options.mask_lr)
        self._step = 0

    def epoch_indices(self, task: Task, epoch: int) -> torch.Tensor | None:
        stage, passes = self._plan[epoch]
        if stage == GROW and self._skip_growth:  # target met: no growth stage
            passes = 0
        if passes == 1:
            return None
        return torch.arange(len(self.train_split(task)), device=self.device).repeat(passes)

    def observe(self, batch: Batch) -> torch.Tensor:
        growing = self.channel_optimizer is not None
        if growing:  # anneal beta geometrically from 1 to beta_max over the growth stage
            self.gates.set_beta(self.options.beta_max ** min(self._step / self._growth_steps, 1.0))
            self._step += 1
            self.channel_optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.mask_optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.model(batch.x), batch.y, batch.task_id)
        if growing and self.options.lam > 0:
            loss = loss + self.options.lam * self.gates.penalty()
        loss.backward()
        self.optimizer.step()
        self.mask_optimizer.step()
        if growing:
            self.channel_optimizer.step()
        return loss.detach()

    def current_accuracy(self, task: Task) -> float:
        """Task-IL accuracy of the network as it is now on the task's validation split (held out
        from its training data; deterministic gates, BN in eval mode)."""
        was = self.model.training
        self.model.eval()
        self.gates.train(False)
        classes = torch.as_tensor(task.classes, device=self.device)
        try:
            return task_il_accuracy(self.model, self.held_out(task)[1], classes, self.ctx.augment)
        finally:
            self.model.train(was)
            self.gates.train(True)

    def end_epoch(self, task: Task, epoch: int) -> None:
        if epoch + 1 >= len(self._plan) or (self._plan[epoch][0], self._plan[epoch + 1][0]) != (REUSE, GROW):
            return
        self._decision = self.current_accuracy(task)
        if self._decision < self._target_acc:
            self._start_growth()
        else:
            self._skip_growth = True

    @torch.no_grad()
    def end_task(self, task: Task) -> None:
        t = task.index
        kept = 0
        for g in self.gates.groups:
            kept += int(self.gates.channel_gate(g).binarise_().sum())
        self._gates_changed()
        on = self.gates.channels_on()
        use: dict[str, torch.Tensor] = {}
        params = dict(self.model.named_parameters())
        for n in self.ownership.names:
            use[n] = self.gates.kernel_gate(n).hard() & self.gates.alive(n, on)
        self._record(t, use, kept)
        for n in self.ownership.names:
            mine = use[n].expand_as(params[n]) & self.ownership.free(n)
            self.ownership.assign_(n, mine, t)
        self.stats["size_total"].append(self.ownership.n_used() / self.total_weights)
        self._guard.unhook()
        self.channel_optimizer = None
        self.use.append(use)
        self.channels.append(on)
        self.snapshots.append({n: v.detach().clone() for n, v in self._shared_state().items()})

    def _record(self, t: int, use: dict[str, torch.Tensor], kept: int) -> None:
        """Per-task decisions and mask statistics (kernel counts; None where there is nothing to count)."""
        def frac(part: int, whole: int) -> float:
            return part / whole if whole else float("nan")

        count = lambda masks: sum(int(m.sum()) for m in masks)  # noqa: E731
        names = self.ownership.names
        frozen, released = count(self._frozen.values()), count(self._released.values())
        old = t > 0  # task 1's "old" kernels are the untrained seed, not earlier tasks' weights
        growable = count(self._growing.values()) if self._growing is not None else 0
        in_use = sum(int(use[n].sum()) * self.kernel_numel[n] for n in names)
        row = {
            "stage1_accuracy": self._decision,
            "growth_stage": float(self._growing is not None),
            "grew": float(kept > 0),
            "channels_kept": float(kept),
            "grown_kept": frac(kept, growable) if self._growing is not None else float("nan"),
            "selected": frac(count(use[n] & self._frozen[n] for n in names), frozen) if old else float("nan"),
            "released": frac(released, count(self._alive.values())) if old else float("nan"),
            "released_kept": frac(count(use[n] & self._released[n] for n in names), released) if old else float("nan"),
            "kernel_logit_scale": self._scale,
            "size_task": in_use / self.total_weights,
        }
        for k, v in row.items():
            self.stats[k].append(v)

    # ---------------------------------------------------------------- evaluation
    def _gate_buffers(self) -> dict[str, torch.Tensor]:
        out = {f"c.{k}": v for k, v in self.gates.channel.state_dict(keep_vars=True).items() if not k.endswith(".s")}
        out.update({f"k.{k}": v for k, v in self.gates.kernel.state_dict(keep_vars=True).items()
                    if not k.endswith(".score")})
        return out

    def _view_tensors(self) -> dict[str, torch.Tensor]:
        return {**self._shared_state(), **self._gate_buffers()}

    def _views_active(self, active: bool) -> None:
        self.gates.train(not active)
        if not active:  # the live gates are back
            self._gates_changed()

    def _gates_changed(self) -> None:
        """After the channel gates changed: which channels the layers compute, and the FLOP
        counter's share of each layer (only a model with a reserve has anything to tell)."""
        self.gates.refresh_active()
        if self.model.allocation:
            for n, d in self.gates.densities().items():
                self.ctx.flops.set_density(n, d)

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
        self._gates_changed()
        self._view = j

    def _view_state(self) -> dict[str, torch.Tensor]:
        """The loaded task's state with its fixed gates baked into the weights (for the export)."""
        return self.gates.bake(super()._view_state())

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        nan = lambda v: None if v != v else round(v, 6)  # noqa: E731  (JSON has no NaN)
        st = {k: [nan(v) for v in vs] for k, vs in self.stats.items()}
        for k in ("growth_stage", "grew", "channels_kept"):
            st[k] = [int(v) for v in self.stats[k]]
        return {
            **st,
            "model_size": st["size_total"][-1] if st["size_total"] else 0.0,
            "size_unit": "full backbone (conv/linear weights)",
            "target": [nan(v) for v in self.targets] if self.targets else self.options.target,
            "decided_on": f"validation ({self.options.val_fraction:g} of each task's training data)",
            "open_channels": [sum(int(c[g].sum()) for g in c) for c in self.channels],
            "designed_channels": sum(self.gates.designed.values()),
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
            "stats": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.stats.items()},
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
        self.stats = {k: [float(v) for v in state["stats"][k]] for k in STATS}
        self._gates_changed()
