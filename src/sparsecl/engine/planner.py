"""Training FLOPs of a protocol from its schedule, without training (``sparsecl flops``).

The plan walks the run's steps as the engine would (tasks, epochs, batches; the replay buffer's
fill; a sparse method's densities, data removal and importance steps) and feeds the same
:class:`~sparsecl.sparse.flops.FlopCounter` a run uses, so a plan and a real run of the same
configuration count the same samples at the same densities and give bit-identical totals. Only the
arithmetic needs no data: the model is built for the benchmark's shape (registered protocol shapes,
or the benchmark loaded when it has none) and profiled, never trained.

Methods planned: ``sgd``, ``ewc``, ``er``, ``der``, ``der++``, ``a-gem``, ``rigl-der++``,
``sparcl-er`` and ``sparcl-der++``. A SparCL schedule whose data removal depends on the data order
(a stage that spans an epoch boundary and removes more examples than one epoch's part of it
visited) cannot be planned exactly and is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sparsecl import SparseCLError
from sparsecl.config import RunConfig, build_options
from sparsecl.data.benchmarks import BENCHMARKS, ProtocolShape, load_benchmark
from sparsecl.data.stream import hold_out_validation
from sparsecl.methods import METHODS
from sparsecl.methods.sparcl import ddr_target, importance_read, stage_count, stage_ends_by
from sparsecl.models import build_model
from sparsecl.sparse.allocation import allocate
from sparsecl.sparse.flops import CONVENTIONS, FlopCounter, profile_layers

PLANNED = ("sgd", "ewc", "er", "der", "der++", "a-gem", "rigl-der++", "sparcl-er", "sparcl-der++")


def protocol_shape(cfg: RunConfig) -> ProtocolShape:
    """The benchmark's registered protocol shape, or (other benchmarks, other task splits) the
    shape of the loaded stream."""
    info = BENCHMARKS.get(cfg.benchmark)
    if info.shape is not None and cfg.n_tasks is None and cfg.class_order is None and not cfg.validation:
        return info.shape
    stream = load_benchmark(cfg.benchmark, cfg.data_dir, class_order=cfg.class_order, n_tasks=cfg.n_tasks,
                            root=cfg.data_root, image_size=cfg.image_size, download=cfg.download)
    if cfg.validation:
        stream = hold_out_validation(stream, cfg.validation)
    return ProtocolShape(stream.input_shape, stream.n_classes, tuple(len(t.train) for t in stream.tasks),
                         stream.default_backbone)


@dataclass
class _Layers:
    """Active weights (and weights with a gradient) of the masked layers, pushed into the counter."""

    counter: FlopCounter
    numel: dict[str, int]
    active: dict[str, int]
    grad: dict[str, int]

    def push(self, dense_grad: bool = False) -> None:
        known = {p.weight for p in self.counter.layers}
        for n, numel in self.numel.items():
            if n in known:
                g = 1.0 if dense_grad else self.grad[n] / numel
                self.counter.set_density(n, self.active[n] / numel, g)


class Plan:
    """One configuration's planned run (see the module docstring)."""

    def __init__(self, cfg: RunConfig) -> None:
        cfg.validate()
        if cfg.method not in PLANNED:
            raise SparseCLError(f"the FLOP planner does not model method {cfg.method!r} (planned: {', '.join(PLANNED)})")
        self.cfg = cfg
        cls = METHODS.get(cfg.method)
        self.o = build_options(cls.options_cls, dict(cfg.method_options), f"method {cfg.method!r}")
        self.shape = protocol_shape(cfg)
        k = self.shape.n_classes // len(self.shape.train_sizes)
        task_classes = ([list(range(t * k, (t + 1) * k)) for t in range(len(self.shape.train_sizes))]
                        if cfg.setting == "task-il" else None)
        self.model = build_model(cfg.backbone or self.shape.default_backbone, self.shape.input_shape,
                                 self.shape.n_classes, task_classes=task_classes, **cfg.backbone_options)
        self.counter = FlopCounter(profile_layers(self.model, self.shape.input_shape), cfg.flop_convention)
        self.layers: _Layers | None = None
        if hasattr(self.o, "sparsity"):  # a masked method: the allocation's exact counts
            params = dict(self.model.named_parameters())
            names = self.o.mask_policy().select(self.model)
            counts = allocate(self.o.allocation, {n: tuple(params[n].shape) for n in names}, 1.0 - self.o.sparsity)
            self.layers = _Layers(self.counter, {n: params[n].numel() for n in names}, dict(counts), dict(counts))
            self.layers.push()
        self.capacity = getattr(self.o, "buffer_size", 0)
        self.minibatch = getattr(self.o, "minibatch_size", None) or cfg.batch_size
        self.seen = 0  # examples offered to the reservoir
        self.task_memory = 0  # A-GEM's episodic memory
        self.rigl_t = self.rigl_t_end = 0  # RigL-DER++: optimiser steps of the schedule, its T_end

    # ------------------------------------------------------------------ per step
    def _episodic(self) -> bool:
        """A-GEM with a memory filled at task ends (not the reservoir)."""
        return self.cfg.method == "a-gem" and self.o.memory != "reservoir"

    def _buffer_len(self) -> int:
        if self._episodic():
            return self.task_memory
        return min(self.seen, self.capacity)

    def _replay_rows(self) -> int:
        """Buffer rows the step trains on (the methods' draws)."""
        m = min(self.minibatch, self._buffer_len())
        if self.cfg.method in ("der", "der++", "rigl-der++", "sparcl-der++"):
            return m * (2 if self.o.beta != 0 else 1)
        return m if self.cfg.method in ("er", "a-gem", "sparcl-er") else 0

    def _selection_rows(self, n: int, replay: int) -> int:
        """Rows SparCL's two importance backward passes traverse (see ``StepOutputs``)."""
        if self.cfg.method == "sparcl-er":
            return 2 * (n + replay) if replay else n
        if replay == 0 or self.o.beta == 0:
            return n + replay if self.o.fused_forward else n
        return 2 * (n + replay) if self.o.fused_forward else n + replay // 2

    def _step(self, n: int, gather: bool = False) -> None:
        replay = self._replay_rows()
        rigl_update = False
        if self.cfg.method == "rigl-der++":
            t = self.rigl_t + 1
            rigl_update = t % self.o.delta_t == 0 and t < self.rigl_t_end
            if rigl_update:
                self.layers.push(dense_grad=True)
        self.counter.train_samples(n)
        if replay:
            self.counter.train_samples(replay, replay=True)
        if gather:
            self.counter.selection_samples(self._selection_rows(n, replay))
        if rigl_update:
            self.layers.push()
        if self.cfg.method == "rigl-der++":
            self.rigl_t += 1
        if not self._episodic():
            self.seen += n

    def _batches(self, kept: int) -> int:
        bs = self.cfg.batch_size
        return kept // bs if self.cfg.drop_last else math.ceil(kept / bs)

    # ------------------------------------------------------------------ per task
    def _dense_task(self, n: int) -> None:
        bs = self.cfg.batch_size
        for _ in range(self.cfg.epochs):
            for b in range(self._batches(n)):
                self._step(min(bs, n - b * bs))

    def _task_end(self, t: int, n: int) -> None:
        if self.cfg.method == "ewc":  # the Fisher's per-example passes over the task's data
            self.counter.train_samples(n, extra=True)
        if self._episodic():
            per_task = self.cfg.batch_size if self.o.memory == "batch" else self.capacity // len(self.shape.train_sizes)
            self.task_memory += min(per_task, n)

    def run(self) -> dict[str, Any]:
        sizes = self.shape.train_sizes
        steps = [math.ceil(n / self.cfg.batch_size) * self.cfg.epochs for n in sizes]  # RigL's schedule
        per_task, before = [], 0.0
        for t, n in enumerate(sizes):
            if self.cfg.method == "rigl-der++":
                if self.o.schedule == "task":
                    self.rigl_t = 0
                self.rigl_t_end = int(self.o.t_end * (steps[t] if self.o.schedule == "task" else sum(steps)))
            if self.cfg.method.startswith("sparcl-"):
                _SparCLTask(self, t, n).run()
            else:
                self._dense_task(n)
            self._task_end(t, n)
            total = self.counter.total
            per_task.append(total - before)
            before = total
        return self.result(per_task)

    def result(self, per_task: list[float]) -> dict[str, Any]:
        c = self.counter
        conventions = {}
        for conv in CONVENTIONS:
            tot = c.totals(conv)
            conventions[conv] = {"train": tot["train"], "dense_equivalent": tot["dense_equivalent"],
                                 "ratio": tot["train"] / tot["dense_equivalent"] if tot["dense_equivalent"] else None}
        own = conventions[c.convention]
        selection = c.selection
        return {"method": self.cfg.method, "benchmark": self.cfg.benchmark, "convention": c.convention,
                "train": own["train"], "dense_equivalent": own["dense_equivalent"], "ratio": own["ratio"],
                "per_task": per_task, "conventions": conventions,
                "selection": {"flops": selection, "share_of_train": selection / own["train"] if own["train"] else None,
                              "samples": c.n_selection_samples},
                "samples": {"trained": c.n_train_samples, "replayed": c.n_replay_samples}}


class _SparCLTask:
    """SparCL's schedule for one task: stages, inter-task expansion, DDR counts, DGM refreshes and
    importance steps, with the rules of :mod:`sparsecl.methods.sparcl`."""

    def __init__(self, plan: Plan, t: int, n: int) -> None:
        self.p, self.o, self.t, self.n = plan, plan.o, t, n
        self.n_stages = stage_count(plan.cfg.epochs, self.o.delta_k)
        self.stage = 0
        self.removed = 0
        self.steps = self.stage_steps = 0
        self.gathered = False  # importance gathered since the last stage end
        self.visits: dict[int, int] = {}  # rows trained per epoch in this stage
        self.epoch = 0
        self.expanded: dict[str, int] = {}

    def run(self) -> None:
        p, o, L = self.p, self.o, self.p.layers
        L.grad = dict(L.active)  # gradient masks cleared at a task's start
        if o.tdm and self.t > 0 and o.p_inter > 0:
            for name, numel in L.numel.items():
                k = min(round(o.p_inter * numel), numel - L.active[name])
                if k > 0:
                    L.active[name] += k
                    L.grad[name] = L.active[name]
                    self.expanded[name] = k
        L.push()
        bs = p.cfg.batch_size
        for epoch in range(p.cfg.epochs):
            self.epoch = epoch
            kept = self.n - self.removed
            batches = max(1, math.ceil(kept / bs))
            n_batches = p._batches(kept)
            for b in range(n_batches):
                size = min(bs, kept - b * bs)
                gather = self.stage_steps % o.importance_every == 0 and importance_read(o, self.stage, self.n_stages)
                p._step(size, gather)
                self.gathered |= gather
                self.visits[epoch] = self.visits.get(epoch, 0) + size
                self.steps += 1
                self.stage_steps += 1
                if o.dgm and o.dgm_interval and self.steps % o.dgm_interval == 0:
                    self._refresh()
                progress = epoch + min((b + 1) / batches, 1.0 - 1e-9)
                while stage_ends_by(progress, self.stage, self.n_stages, o.delta_k):
                    self._stage_end(mid_epoch=b + 1 < n_batches)
            while stage_ends_by(epoch + 1.0, self.stage, self.n_stages, o.delta_k):
                self._stage_end(mid_epoch=False)

    def _refresh(self) -> None:
        if not self.gathered:
            return
        L = self.p.layers
        gs = self.o.effective_grad_sparsity()
        for name, numel in L.numel.items():
            L.grad[name] = min(round((1.0 - gs) * numel), L.active[name])
        L.push()

    def _stage_end(self, mid_epoch: bool) -> None:
        o, L = self.o, self.p.layers
        self.stage += 1
        if o.tdm:
            for name, k in self.expanded.items():
                L.active[name] -= k
            self.expanded = {}
            if not o.dgm:
                L.grad = dict(L.active)
            L.push()
        if o.ddr and self.stage <= o.ddr_cutoff:
            want = ddr_target(o.ddr_rho, self.n, self.stage, o.ddr_cutoff) - self.removed
            visited = max(self.visits.values(), default=0)  # distinct within one epoch's part
            spans = len(self.visits) > 1
            if want > visited and spans:
                raise SparseCLError(f"cannot plan DDR exactly: stage {self.stage} of task {self.t + 1} spans an epoch "
                                    "boundary and the examples it visited depend on the data order")
            k = max(0, min(want, visited))
            if k and mid_epoch and spans:
                raise SparseCLError(f"cannot plan DDR exactly: stage {self.stage} of task {self.t + 1} removes data "
                                    "mid-epoch that may still be ahead in the epoch's order")
            self.removed += k
        if o.dgm:
            self._refresh()
        self.gathered = False
        self.visits = {}
        self.stage_steps = 0


def plan_flops(cfg: RunConfig) -> dict[str, Any]:
    """The planned training FLOPs of ``cfg`` (see :class:`Plan`)."""
    return Plan(cfg).run()
