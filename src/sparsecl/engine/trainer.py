"""The continual-learning loop: tasks -> epochs -> batches -> method hooks, with evaluation after
every task, efficiency accounting, atomic results and resumable checkpoints."""
from __future__ import annotations

import io
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from sparsecl import SparseCLError, first_line
from sparsecl.config import RunConfig, build_options, config_from_text, first_difference, run_identity, save_config
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.benchmarks import load_benchmark
from sparsecl.data.stream import Task, TaskStream, hold_out_validation
from sparsecl.engine.distributed import Distributed
from sparsecl.engine.evaluate import evaluate_all
from sparsecl.engine.graph import TaskSteps
from sparsecl.engine.io import RunDirLock, atomic_torch_save, atomic_write_json, remove_stale_temporaries
from sparsecl.engine.launch import launched_world_size
from sparsecl.engine.progress import RunProgress
from sparsecl.engine.loggers import RunObserver, check_loggers, loggers_for
from sparsecl.engine.results import Memory, RunResult, Samples, accuracy_results, flops_result, timing_result, versions
from sparsecl.engine.seeding import rng_state, seed_everything, set_rng_state
from sparsecl.methods import METHODS, Batch, ContinualMethod, MethodContext
from sparsecl.metrics.efficiency import memory_footprint, peak_memory_bytes, reset_peak_memory
from sparsecl.models import build_model
from sparsecl.sparse.accounting import capacity_report, sparsity_report
from sparsecl.sparse.capacity import widen_
from sparsecl.sparse.execution import SparseExecution
from sparsecl.sparse.kernel_choice import KernelChoices
from sparsecl.sparse.export import INFERENCE_HEAD, TASK_VIEWS, compact_task_views, method_task_views
from sparsecl.sparse.flops import FlopCounter, profile_layers

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_KEYS = ("task", "model", "method", "flops", "counter", "state", "rng")
RESULT = "result.json"
CONFIG = "config.yaml"


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device`` (cpu, cuda, cuda:N or auto): one line for any other
    device type or one this machine lacks (checked before data is loaded)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparseCLError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise SparseCLError(f"device {name!r} is not supported (use cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparseCLError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SparseCLError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class SampleCounter:
    """Counts every sample that goes through the model while training, via one forward pre-hook.

    A forward with autograd enabled is a training sample (forward + backward); without autograd it
    is forward-only (e.g. a teacher's logits). Methods therefore need no bookkeeping of their own,
    and buffer samples, second passes and skipped data are all reflected automatically. Within a
    step, the first rows trained are the current batch, and rows beyond it are replayed as far as
    the method drew buffer samples in the step (:meth:`note_replay`; SAM's second pass of the same
    rows is training again); samples outside the steps (task-end passes) are counted as such.
    """

    def __init__(self, model: nn.Module, flops: FlopCounter) -> None:
        self.flops = flops
        self.active = False
        self.train_samples = 0
        self.forward_samples = 0
        # The memory formula's batch size: the most training samples of the current step whose
        # activations are alive at once. A forward adds its samples; a backward through its output
        # frees the graph, so sequential passes (SAM's two) count as their largest, while DER++'s
        # three forwards under one loss count together.
        self.step_samples = 0
        self._live = 0
        self.in_step = False  # between new_step() and end_steps(): samples of training steps
        self._current_left = self._replay_left = 0
        # Distributed, sharded step: each rank sees 1/world of the step's samples, so counts are
        # scaled by the world size and every rank holds the global (single-process) totals.
        self.scale = 1
        self._handle = model.register_forward_pre_hook(self._hook)
        self._out_handle = model.register_forward_hook(self._watch_output)

    def new_step(self, current: int = 0) -> None:
        """Called by the engine before each training step of ``current`` (global) examples."""
        self.step_samples = self._live = 0
        self.in_step = True
        self._current_left, self._replay_left = int(current), 0

    def end_steps(self) -> None:
        """Called after a task's last step: later passes (task-end) are outside the steps."""
        self.in_step = False

    def note_replay(self, n: int) -> None:
        """The method drew ``n`` (global) buffer samples for this step's training."""
        self._replay_left += int(n)

    # Under --compile the hook runs eagerly beside the compiled graph (a graph break before the
    # forward), so its Python counting is not traced into, or frozen by, the compiled code.
    @torch.compiler.disable
    def _hook(self, module: nn.Module, args: tuple) -> None:
        if not self.active or not args:
            return
        n = int(args[0].shape[0])
        if torch.is_grad_enabled():
            self._live += n  # per device: it sizes the activation memory
            self.step_samples = max(self.step_samples, self._live)
            n *= self.scale
            current = min(n, self._current_left)
            replay = min(n - current, self._replay_left)
            self._current_left -= current
            self._replay_left -= replay
            self._count(n, 0, replay)
        else:
            self._count(0, n * self.scale, 0)

    def _count(self, train: int, forward: int, replay: int) -> None:
        """``train`` training samples (``replay`` of them from the buffer), ``forward`` forward-only."""
        extra = not self.in_step
        self.train_samples += train
        self.forward_samples += forward
        if train - replay:
            self.flops.train_samples(train - replay, extra=extra)
        if replay:
            self.flops.train_samples(replay, replay=True, extra=extra)
        if forward:
            self.flops.forward_samples(forward, extra=extra)

    @torch.compiler.disable
    def _watch_output(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.active and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._freed)

    def _freed(self, grad: torch.Tensor) -> None:
        self._live = 0  # a backward reached this forward's output: its graph is being freed

    def add(self, train: int, forward: int, replay: int = 0) -> None:
        """Count passes the hook cannot see (a CUDA graph replay, per-sample gradients)."""
        self._count(train * self.scale, forward * self.scale, replay * self.scale)

    def state_dict(self) -> dict[str, int]:
        return {"train_samples": self.train_samples, "forward_samples": self.forward_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.train_samples = int(state["train_samples"])
        self.forward_samples = int(state["forward_samples"])


@dataclass
class RunParts:
    """A run's method on its model, with the accounting its context carries (:func:`build_run`)."""

    method: ContinualMethod
    flops: FlopCounter  # its ``layers``: the model's conv/linear layers, profiled before the method existed
    counter: SampleCounter


def method_class(cfg: RunConfig, stream: TaskStream) -> type[ContinualMethod]:
    """The method class of ``cfg``, once it is known to support the setting and benchmark."""
    cls = METHODS.get(cfg.method)
    if cfg.setting not in cls.settings:
        raise SparseCLError(
            f"method {cfg.method!r} supports only {', '.join(sorted(cls.settings))}, not {cfg.setting} "
            f"(pass --setting {sorted(cls.settings)[0]})"
        )
    if cfg.setting not in stream.settings:
        raise SparseCLError(f"benchmark {cfg.benchmark!r} supports only {', '.join(sorted(stream.settings))}")
    return cls


def build_run(cfg: RunConfig, stream: TaskStream, device: torch.device, augment: DeviceAugment,
              dist: Distributed | None = None) -> RunParts:
    """Model, FLOP and sample accounting, then the method with its complete context.

    The layers are profiled on the bare model: a method's own modules (e.g. CL-LSG's gates, which
    draw noise in training mode) are never run by the profiler's dummy forward."""
    cls = method_class(cfg, stream)
    options = build_options(cls.options_cls, dict(cfg.method_options), f"method {cfg.method!r}")
    task_classes = [t.classes for t in stream.tasks] if cfg.setting == "task-il" else None
    model = build_model(
        cfg.backbone or stream.default_backbone, stream.input_shape, stream.n_classes,
        task_classes=task_classes, **cfg.backbone_options,
    )
    if options.model_width != 1:  # reserve channels past the designed network (CL-LSG)
        widen_(model, options.model_width, seed=cfg.seed)
    model = model.to(device)
    if dist is not None and cfg.sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BN submodules in place
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    flops = FlopCounter(profile_layers(model, stream.input_shape), cfg.flop_convention)
    counter = SampleCounter(model, flops)
    ctx = MethodContext(stream=stream, device=device, augment=augment, setting=cfg.setting,
                        batch_size=cfg.batch_size, epochs=cfg.epochs, flops=flops, count_samples=counter.add,
                        note_replay=counter.note_replay, cuda_graph=cfg.cuda_graph,
                        fused_optimizer=cfg.fused_optimizer, dist=dist)
    return RunParts(cls(model, options, ctx), flops, counter)


def _check_shapes(mine: dict[str, torch.Tensor], saved: Any) -> None:
    """Name the first model tensor whose saved shape differs from the one this run builds (a
    checkpoint of other model options, or of a version that built the model otherwise)."""
    for key, t in mine.items():
        other = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(other, torch.Tensor) and other.shape != t.shape:
            raise ValueError(f"its {key} is {tuple(other.shape)}, this run builds {tuple(t.shape)}: "
                             f"written with other model options or by another sparsecl version")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def sparse_execution(cfg: RunConfig, method: ContinualMethod) -> SparseExecution | None:
    """The run's real sparse execution (``--sparse-kernels``), installed on the method's model, or None."""
    if cfg.sparse_kernels == "off":
        return None
    if not type(method).supports_sparse_kernels:
        known = ", ".join(n for n, cls in METHODS.items() if cls.supports_sparse_kernels)
        raise SparseCLError(f"method {cfg.method!r} does not support --sparse-kernels (methods that do: {known})")
    for flag, on in (("--compile", cfg.compile), ("--amp", cfg.amp), ("--cuda-graph", cfg.cuda_graph),
                     ("torchrun", launched_world_size() > 1)):
        if on:
            raise SparseCLError(f"--sparse-kernels cannot be combined with {flag}")
    choices = KernelChoices() if cfg.sparse_kernels == "auto" else None
    return SparseExecution(method.model, lambda: method.execution_masks, choices=choices).install()


def compile_net(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """``torch.compile`` of ``model`` (or its DDP wrapper) for the training forwards
    (``method.net``; the parameters stay the model's own, so masks applied in place, checkpoints
    and evaluation are unchanged).
    ``cfg.compile`` is ``BACKEND`` or ``inductor:MODE`` (e.g. ``inductor:reduce-overhead``, which
    adds CUDA graphs). Only methods whose training forwards all go through ``method.net`` can use
    it; fixed shapes, so a new batch size compiles a new graph."""
    if cfg.cuda_graph:
        raise SparseCLError("--compile and --cuda-graph cannot be combined (pick one way to capture the step)")
    if not METHODS.get(cfg.method).supports_compile:
        raise SparseCLError(f"method {cfg.method!r} does not support --compile (its training forwards do not all "
                            "go through method.net)")
    backend, _, mode = cfg.compile.partition(":")
    if backend not in torch.compiler.list_backends(exclude_tags=()):
        raise SparseCLError(f"unknown --compile backend {backend!r} (e.g. inductor, aot_eager, eager)")
    if mode and (backend != "inductor" or mode not in COMPILE_MODES):
        raise SparseCLError(f"--compile {cfg.compile!r}: modes are for inductor only ({', '.join(COMPILE_MODES)})")
    return torch.compile(model, backend=backend, mode=mode or None, dynamic=False)


def check_distributed(cfg: RunConfig, world_size: int) -> None:
    """One clear error for a configuration that cannot train on ``world_size`` torchrun processes
    (needs no process group, so a launch fails before its ranks meet)."""
    n = world_size
    if not METHODS.get(cfg.method).supports_distributed:
        raise SparseCLError(f"method {cfg.method} does not support distributed training (see docs/distributed.md)")
    if cfg.batch_size % n:
        raise SparseCLError(f"batch size {cfg.batch_size} is not divisible by the world size {n} "
                            "(the batch size is the global batch, split evenly over the ranks)")
    if cfg.cuda_graph:
        raise SparseCLError("--cuda-graph is not supported with distributed training")
    if cfg.sync_bn and not (cfg.device in ("auto", "cuda") and torch.cuda.is_available()):
        raise SparseCLError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU implementation)")


@contextmanager
def distributed_session() -> Iterator[Distributed | None]:
    """The torchrun process group for one run (None in a single process), left at the end."""
    dist = Distributed.from_env()
    try:
        yield dist
    finally:
        if dist is not None:
            dist.close()


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.benchmark}-{cfg.method}-s{cfg.seed}-{stamp}"


def claim_run_dir(cfg: RunConfig, out: str | Path | None = None) -> RunDirLock:
    """Lock the run directory (``out``, else ``cfg.out``, else a new default one) for this run.

    A default name is made unique by creating it exclusively (``-2``, ``-3``, ... when runs start
    in the same second); a named one that already holds a run is refused (``--resume`` it)."""
    if out or cfg.out:
        lock = RunDirLock(Path(out or cfg.out))
        if (lock.run_dir / CHECKPOINT).exists() or (lock.run_dir / RESULT).exists():
            lock.release()
            raise SparseCLError(f"run directory {lock.run_dir} already holds a run: use --resume {lock.run_dir} "
                                "or another --out")
        return lock
    base, i = default_run_dir(cfg), 1
    while True:
        try:
            return RunDirLock(base if i == 1 else base.with_name(f"{base.name}-{i}"), exclusive_create=True)
        except FileExistsError:
            i += 1


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, carrying the run directory and how many tasks are checkpointed."""

    def __init__(self, run_dir: Path, completed: int) -> None:
        super().__init__(str(run_dir))
        self.run_dir, self.completed = run_dir, completed


def check_device_options(cfg: RunConfig, device: torch.device) -> None:
    """One clear error for options this device (or the method) cannot run, before data is loaded."""
    if device.type != "cuda":
        # --channels-last: torch 2.13's CPU kernels crash (heap corruption) in the backward of a
        # channels_last strided 1x1 convolution with few input channels, e.g. a narrow ResNet's shortcut.
        for flag, on, what in (("--amp", cfg.amp, " (bf16 autocast)"), ("--channels-last", cfg.channels_last, ""),
                               ("--cuda-graph", cfg.cuda_graph, "")):
            if on:
                raise SparseCLError(f"{flag}{what} is supported on CUDA devices only")
    if cfg.cuda_graph and not METHODS.get(cfg.method).graph_capturable:
        raise SparseCLError(f"method {cfg.method!r} does not support --cuda-graph yet")


def new_state(n_tasks: int) -> dict[str, Any]:
    """What a run records as it goes (checkpointed whole; :meth:`Trainer.result` reads it)."""
    return {
        "completed": 0,
        "class_il": [[None] * n_tasks for _ in range(n_tasks)],
        "task_il": [[None] * n_tasks for _ in range(n_tasks)],
        "random_init": None,
        "train_seconds": [], "eval_seconds": [], "samples": [], "flops": [], "dense_flops": [],
        "epoch_loss": [], "peak_memory": [], "footprint": None, "max_step_samples": 0,
    }


class Trainer:
    """Runs one configuration end to end (:meth:`restore` first to continue a run). See :func:`run`
    for the simple entry point."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = False,
                 dist: Distributed | None = None, observers: Sequence[RunObserver] = ()) -> None:
        """``dist``: this rank's process group under torchrun (see :func:`distributed_session`);
        every rank then builds the same seeded run, and only rank 0 writes files. ``observers``:
        told of every step, epoch and task on rank 0 (beside the loggers ``cfg`` asks for)."""
        cfg.validate()
        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist
        self.is_main = dist is None or dist.is_main
        self.progress = progress and self.is_main
        self.device = self._claim_device()
        check_device_options(cfg, self.device)
        seed_everything(cfg.seed)  # the same seed on every rank: identical init, orders and draws
        self.stream = self._load_stream()
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.augment = DeviceAugment(self.stream.augment, self.stream.input_shape, memory_format=memory_format)
        if cfg.cuda_graph:
            self.augment.prepare(self.device)
        parts = build_run(cfg, self.stream, self.device, self.augment, dist)
        self.method, self.flops, self.counter = parts.method, parts.flops, parts.counter
        self.model = self.method.model
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        self.execution = sparse_execution(cfg, self.method)  # after profiling: it bypasses module hooks
        self.state = new_state(self.stream.n_tasks)
        self._bind_kernel_choices()
        if dist is not None:
            self.method.net = dist.wrap(self.model)
        if cfg.compile:  # under torchrun the DDP module is compiled (dynamo splits it at its buckets)
            self.method.net = compile_net(self.method.net, cfg)
        self.extra_observers = tuple(observers)
        self.observers: list[RunObserver] = []  # rank 0, during run(): loggers, then the caller's

    def _claim_device(self) -> torch.device:
        """This process's device, checked (with the loggers' libraries) before any data is loaded;
        the thread count is fixed here (recorded in config.yaml: a run reproduces for its count)."""
        cfg, dist = self.cfg, self.dist
        if self.is_main:
            check_loggers(cfg)
        if dist is None:
            device = resolve_device(cfg.device)
        else:
            device = dist.select_device(cfg.device)
            check_distributed(cfg, dist.world_size)  # also covers resume and direct use
        if cfg.threads is None:
            cfg.threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        return device

    def _load_stream(self) -> TaskStream:
        """The benchmark on this device (under torchrun read once per rank, in turn)."""
        cfg = self.cfg

        def load() -> TaskStream:
            stream = load_benchmark(
                cfg.benchmark, cfg.data_dir, class_order=cfg.class_order, n_tasks=cfg.n_tasks,
                root=cfg.data_root, image_size=cfg.image_size, download=cfg.download,
            )
            return hold_out_validation(stream, cfg.validation) if cfg.validation else stream

        return (load() if self.dist is None else self.dist.everywhere(load)).to(self.device)

    def _bind_kernel_choices(self) -> None:
        """``--sparse-kernels auto``: its per-layer decisions live in the (checkpointed) state."""
        if self.execution is not None and self.execution.choices is not None:
            self.execution.choices.decisions = self.state.setdefault("kernel_choices", {})

    # ------------------------------------------------------------ training
    def _step(self, split, idx: torch.Tensor, task_index: int) -> torch.Tensor:
        """One training step on the examples ``idx`` of ``split``; returns the detached loss."""
        x_raw, y = split.x[idx], split.y[idx]
        with self.autocast:
            if self.dist is None:
                return self.method.observe(Batch(self.augment.train(x_raw), y, x_raw, idx, task_index))
            return self._distributed_step(x_raw, y, idx, task_index)

    def _distributed_step(self, x_raw: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, task_index: int) -> torch.Tensor:
        """One step of the global batch ``idx``: sharded over the ranks when the batch and every
        buffer draw split evenly (the mean of the ranks' mean losses is then the global mean
        loss), else computed whole on every rank. The whole batch is augmented on every rank, so
        the RNG streams stay those of a single process."""
        d, method = self.dist, self.method
        x = self.augment.train(x_raw)
        d.sharded = d.divides(int(idx.shape[0])) and all(d.divides(n) for n in method.draw_sizes())
        self.counter.scale = d.world_size if d.sharded else 1
        batch = Batch(d.shard(x), d.shard(y), d.shard(x_raw), d.shard(idx), task_index)
        if d.sharded:
            batch.full_x_raw, batch.full_y = x_raw, y
        try:
            return method.observe(batch)
        finally:
            d.sharded, self.counter.scale = False, 1

    def _train_task(self, task_index: int, bar: RunProgress) -> None:
        """Every epoch of one task between the method's begin_task and end_task."""
        task, method = self.stream.tasks[task_index], self.method
        method.begin_task(task)
        split = method.train_split(task)
        bar.start_task(task_index, self.cfg.epochs)
        self.model.train()
        self.counter.active = True
        steps = TaskSteps(lambda idx: self._step(split, idx, task_index), self.counter, method,
                          self.cfg.batch_size, self.device, self.cfg.cuda_graph)
        losses = [self._epoch(task, epoch, len(split), steps, bar) for epoch in range(self.cfg.epochs)]
        steps.close()  # frees a captured graph's memory pool before the next task captures its own
        if self.dist is not None:  # per-rank BatchNorm statistics: evaluate and save rank 0's
            self.dist.broadcast_buffers_(self.model)
        self.counter.end_steps()
        method.end_task(task)
        self.counter.active = False
        self.state["epoch_loss"].append(losses)

    def _epoch_order(self, task: Task, epoch: int, n: int) -> torch.Tensor:
        """The shuffled positions of the split that ``epoch`` trains on."""
        keep = self.method.epoch_indices(task, epoch)
        if keep is None:
            return torch.randperm(n, device=self.device)
        return keep[torch.randperm(int(keep.shape[0]), device=self.device)]  # data removal: a subset

    def _n_batches(self, n: int) -> int:
        bs = self.cfg.batch_size
        return n // bs if self.cfg.drop_last else math.ceil(n / bs)

    def _epoch(self, task: Task, epoch: int, n: int, steps: TaskSteps, bar: RunProgress) -> float | None:
        """One epoch of ``task``; returns its mean loss (None for an epoch the method skipped)."""
        bs, t = self.cfg.batch_size, task.index
        perm = self._epoch_order(task, epoch, n)
        n_batches = self._n_batches(perm.shape[0])
        bar.start_epoch(n_batches, self.counter.train_samples)
        steps.loss_sum.zero_()
        b = 0
        while b < n_batches:
            for observer in self.observers:
                observer.before_step(t)
            steps.run(perm[b * bs : (b + 1) * bs])
            for observer in self.observers:
                observer.after_step(t)
            self.state["max_step_samples"] = max(self.state["max_step_samples"], self.counter.step_samples)
            bar.batch_done()
            b += 1
            rest = self.method.epoch_rest(perm[b * bs :])
            if rest is not None:  # data removed mid-epoch: fewer steps, full batches
                perm = torch.cat([perm[: b * bs], rest])
                n_batches = b + self._n_batches(rest.shape[0])
        steps.sync()
        mean_loss = self._mean_loss(steps.loss_sum, n_batches, t, epoch)
        if mean_loss is not None:
            for observer in self.observers:
                observer.epoch(t * self.cfg.epochs + epoch + 1, t, mean_loss)
        self.method.end_epoch(task, epoch)
        bar.epoch_done(mean_loss, self.counter.train_samples)
        return mean_loss

    def _mean_loss(self, loss_sum: torch.Tensor, n_batches: int, task_index: int, epoch: int) -> float | None:
        """The epoch's mean loss, with one host sync; a NaN or infinite loss stops the run in one line.
        An epoch without batches (e.g. CL-LSG once its target is met) has no loss: None, not 0."""
        total = loss_sum
        if self.dist is not None:  # mean over ranks: the global loss, the same NaN check everywhere
            total = self.dist.all_reduce_sum_(loss_sum.clone()) / self.dist.world_size
        mean_loss = total.item() / n_batches if n_batches else None
        if mean_loss is not None and not math.isfinite(mean_loss):
            raise SparseCLError(
                f"loss became {mean_loss} in task {task_index + 1}, epoch {epoch + 1} "
                f"(method {self.cfg.method}, lr {self.method.options.lr}): lower the learning rate"
            )
        return mean_loss

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / CONFIG)
        if self.is_main:
            self.observers = [*loggers_for(cfg, self.run_dir, self.state["completed"]), *self.extra_observers]
        try:
            return self._run()
        finally:
            for observer in self.observers:
                observer.close()
            self.observers = []

    def _run(self) -> dict[str, Any]:
        if self.state["random_init"] is None:
            # The model before any training is the random-init reference b_j of forward transfer.
            cil, til = evaluate_all(self.method, self.stream, self.augment, 0, self.cfg.eval_batch_size, self.dist)
            self.state["random_init"] = {"class_il": cil, "task_il": til}
        with RunProgress(self.stream.n_tasks, self.progress) as bar:
            for t in range(self.state["completed"], self.stream.n_tasks):
                self._task(t, bar)
                bar.task_done()
        if self.is_main:
            self._write_final_files()
        # Written last: `complete: true` means every final file is in place.
        result = self.result(complete=True).to_json()
        if self.is_main:
            atomic_write_json(self.run_dir / RESULT, result)
        return result

    def _task(self, t: int, bar: RunProgress) -> None:
        """Train task ``t``, evaluate every task, record it all, checkpoint, tell the observers."""
        for observer in self.observers:
            observer.task_start(t)
        reset_peak_memory(self.device)
        flops0, dense0, samples0 = self.flops.total, self.flops.dense_total, self.counter.train_samples
        t0 = time.perf_counter()
        self._train_task(t, bar)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        cil, til = evaluate_all(self.method, self.stream, self.augment, t, self.cfg.eval_batch_size, self.dist)
        t2 = time.perf_counter()
        s = self.state
        s["class_il"][t], s["task_il"][t] = cil, til
        s["train_seconds"].append(t1 - t0)
        s["eval_seconds"].append(t2 - t1)
        s["samples"].append(self.counter.train_samples - samples0)
        s["flops"].append(self.flops.total - flops0)
        s["dense_flops"].append(self.flops.dense_total - dense0)
        s["peak_memory"].append(peak_memory_bytes(self.device))
        self._record_footprint()
        s["method"] = self.method.report()
        s["completed"] = t + 1
        if self.is_main:
            self._save_checkpoint(t)
            result = self.result(complete=False).to_json()
            atomic_write_json(self.run_dir / RESULT, result)
            for observer in self.observers:
                observer.task(result, t)

    def _record_footprint(self) -> None:
        """Sparsity, capacity and memory footprint of the model as the last task left it."""
        s, method = self.state, self.method
        s["sparsity"] = sparsity_report(self.model, self.flops.layers, method.masks, method.ownership,
                                        policy=method.mask_scope)
        s["capacity"] = capacity_report(s["sparsity"], method.masks, method.ownership, stored=method.stored_masks())
        wd, gd = method.training_densities()  # EsaCL: dense while training, pruned after
        s["footprint"] = memory_footprint(
            self.flops.layers, self.model, max(s["max_step_samples"], 1), weight_density=wd, grad_density=gd,
            mask_bytes=s["sparsity"]["mask_bytes"] + s["sparsity"]["task_mask_bytes"],
            buffer_bytes=method.memory_bytes(),
        )

    def _write_final_files(self) -> None:
        """The final model and what `sparsecl export` needs beside it."""
        atomic_torch_save(self.run_dir / "model.pt", self.model.state_dict())
        # Per-task subnetworks (isolation methods) for `sparsecl export`: small masks and snapshots.
        views = method_task_views(self.method, self.stream.n_tasks)
        if views is not None:
            atomic_torch_save(self.run_dir / TASK_VIEWS, compact_task_views(self.model.state_dict(), views))
        head = self.method.inference_head()
        if head is not None:  # e.g. iCaRL's class means: the export classifies as the run evaluated
            atomic_torch_save(self.run_dir / INFERENCE_HEAD, head)

    # ---------------------------------------------------------- checkpoint
    def _save_checkpoint(self, task_index: int) -> None:
        ckpt = {
            "format": 1,
            "config": self.cfg.to_dict(),  # resume checks it against the directory's config.yaml
            "task": task_index,
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "flops": self.flops.state_dict(),
            "counter": self.counter.state_dict(),
            "state": self.state,
            "rng": rng_state(self.device),
        }
        atomic_torch_save(self.run_dir / CHECKPOINT, ckpt)
        if self.cfg.keep_checkpoints == "all":
            atomic_torch_save(self.run_dir / f"checkpoint-task{task_index + 1}.pt", ckpt)

    def restore(self) -> None:
        """Load the run directory's checkpoint: :meth:`run` then continues after its last completed
        task, to the result an uninterrupted run gives. One clear error for a missing, unreadable,
        foreign or mismatched checkpoint."""
        ckpt = self._read_checkpoint()
        path = self.run_dir / CHECKPOINT
        try:
            _check_shapes(self.model.state_dict(), ckpt["model"])
            self.model.load_state_dict(ckpt["model"])
            self.method.restore(ckpt["method"], int(ckpt["task"]))
            self.flops.load_state_dict(ckpt["flops"])
            self.counter.load_state_dict(ckpt["counter"])
            if len(ckpt["state"]["class_il"]) != self.stream.n_tasks:
                raise ValueError(f"{len(ckpt['state']['class_il'])} tasks, not {self.stream.n_tasks}")
            set_rng_state(ckpt["rng"], self.device)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise SparseCLError(f"cannot resume: {path} does not fit the run in {self.run_dir} "
                                f"({first_line(e)[:160]})") from None
        self.state = ckpt["state"]
        self._bind_kernel_choices()  # a resumed run keeps the first part's choices

    def _read_checkpoint(self) -> dict[str, Any]:
        """The checkpoint of this run directory, checked to be this run's."""
        path = self.run_dir / CHECKPOINT

        def read() -> bytes:
            if not path.exists():
                raise SparseCLError(f"cannot resume: no checkpoint in {self.run_dir} (no task was completed)")
            return path.read_bytes()

        # Distributed: rank 0 reads its file and sends the bytes, so every rank loads the same
        # checkpoint, whether or not the run directory is on a shared file system.
        data = read() if self.dist is None else self.dist.on_main(read)
        try:
            ckpt = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise SparseCLError(f"cannot resume: checkpoint {path} is unreadable ({type(e).__name__})") from None
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
            raise SparseCLError(f"cannot resume: {path} is not a sparsecl checkpoint")
        if "config" in ckpt:  # older checkpoints carry none; their state must still fit below
            diff = first_difference(run_identity(ckpt["config"]), run_identity(self.cfg.to_dict()))
            if diff:
                raise SparseCLError(f"cannot resume: {path} belongs to another run than {self.run_dir / CONFIG} "
                                    f"({diff})")
        return ckpt

    # -------------------------------------------------------------- result
    def result(self, complete: bool = False) -> RunResult:
        """The run's result so far; ``complete`` only once every final file is written."""
        s, cfg, stream = self.state, self.cfg, self.stream
        done = s["completed"]
        return RunResult(
            complete=complete and done == stream.n_tasks, tasks_completed=done, n_tasks=stream.n_tasks,
            config=cfg.to_dict(), seed=cfg.seed, versions=versions(), device=describe_device(self.device),
            threads=torch.get_num_threads(), distributed=self._distributed_result(),
            benchmark=self._benchmark_result(),
            accuracy=accuracy_results(s, ["class_il", "task_il"] if cfg.setting == "class-il" else ["task_il"]),
            timing=timing_result(s),
            samples=Samples(trained_per_task=s["samples"], trained=sum(s["samples"]),
                            forward_only=self.counter.forward_samples),
            flops=flops_result(s, self.flops), method=s.get("method") or {},
            sparsity=s.get("sparsity"), capacity=s.get("capacity"), model=self._model_result(),
            memory=Memory(footprint_bytes=s["footprint"], peak_bytes_per_task=s["peak_memory"],
                          peak_kind="cuda max allocated" if self.device.type == "cuda" else "process peak RSS"),
            loss_per_epoch=s["epoch_loss"], kernel_choices=s.get("kernel_choices"),
        )

    def _distributed_result(self) -> dict[str, Any] | None:
        d = self.dist
        if d is None:
            return None
        return {"world_size": d.world_size, "backend": d.backend, "per_rank_batch": self.cfg.batch_size // d.world_size}

    def _benchmark_result(self) -> dict[str, Any]:
        stream = self.stream
        return {"name": stream.name, "classes_per_task": [len(t.classes) for t in stream.tasks],
                "train_sizes": [len(t.train) for t in stream.tasks],
                "evaluated_on": "validation" if self.cfg.validation else "test",
                "eval_sizes": [len(t.test) for t in stream.tasks], "class_order": stream.class_order}

    def _model_result(self) -> dict[str, Any]:
        """What rebuilds the model (the export's spec)."""
        return {"backbone": getattr(self.model, "backbone_name", self.cfg.backbone),
                "backbone_options": dict(self.cfg.backbone_options),
                "width": self.method.options.model_width,
                "input_shape": list(self.stream.input_shape), "n_classes": self.stream.n_classes,
                "task_classes": getattr(self.model, "task_classes", None)}


def run(cfg: RunConfig, out: str | Path | None = None, *, progress: bool = False,
        observers: Sequence[RunObserver] = ()) -> tuple[dict[str, Any], Path]:
    """Train and evaluate ``cfg``; returns (result dict, run directory). ``observers`` are told of
    every epoch and completed task (:class:`~sparsecl.engine.loggers.RunObserver`).

    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; they train together with
    DistributedDataParallel and only rank 0 writes the run directory (docs/distributed.md).
    """
    if launched_world_size() > 1:
        check_distributed(cfg, launched_world_size())
    with distributed_session() as dist:
        locks: list[RunDirLock] = []

        def claim() -> str:  # rank 0 only: it alone writes the directory
            locks.append(claim_run_dir(cfg, out))
            return str(locks[0].run_dir)

        run_dir = Path(claim() if dist is None else dist.on_main(claim))
        return _train(lambda: Trainer(cfg, run_dir, progress=progress, dist=dist, observers=observers), run_dir, locks)


def _train(make: Any, run_dir: Path, locks: list[RunDirLock]) -> tuple[dict[str, Any], Path]:
    """Build and run a Trainer while holding the run directory's lock; a run that wrote nothing
    leaves no directory behind, and Ctrl-C becomes :class:`RunInterrupted`."""
    trainer: Trainer | None = None
    try:
        trainer = make()
        return trainer.run(), run_dir
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir, trainer.state["completed"] if trainer else 0) from None
    finally:
        for lock in locks:
            lock.release(remove_if_empty=True)


def resume(run_dir: str | Path, *, device: str | None = None, data_dir: str | None = None,
           progress: bool = False, observers: Sequence[RunObserver] = ()) -> tuple[dict[str, Any], Path]:
    """Continue the run in ``run_dir`` after its last completed task (under ``torchrun`` too:
    rank 0 reads the configuration and checkpoint and sends them to the other ranks). ``device``
    and ``data_dir`` may differ from the run's own (they do not change its results)."""
    run_dir = Path(run_dir)
    locks: list[RunDirLock] = []

    def read() -> str:  # rank 0 only: lock, clear dead writes, read the configuration
        if not (run_dir / CONFIG).is_file():
            raise SparseCLError(f"cannot resume: {run_dir} holds no {CONFIG}")
        locks.append(RunDirLock(run_dir))
        remove_stale_temporaries(run_dir)
        try:
            return (run_dir / CONFIG).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SparseCLError(f"cannot resume: {run_dir / CONFIG} is unreadable ({type(e).__name__})") from None

    with distributed_session() as dist:
        try:
            text = read() if dist is None else dist.on_main(read)
            cfg = config_from_text(text, run_dir / CONFIG)
        except BaseException:
            for lock in locks:
                lock.release()
            raise
        if device is not None:
            cfg.device = device
        if data_dir is not None:
            cfg.data_dir = data_dir

        def restored() -> Trainer:
            trainer = Trainer(cfg, run_dir, progress=progress, dist=dist, observers=observers)
            trainer.restore()
            return trainer

        return _train(restored, run_dir, locks)
