"""The continual-learning loop: tasks -> epochs -> batches -> method hooks, with evaluation after
every task, efficiency accounting, atomic results and resumable checkpoints."""
from __future__ import annotations

import io
import math
import platform
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

import sparsecl
from sparsecl import SparseCLError, first_line
from sparsecl.config import RunConfig, build_options, config_from_text, first_difference, run_identity, save_config
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.benchmarks import load_benchmark
from sparsecl.data.stream import TaskStream, hold_out_validation
from sparsecl.engine.distributed import Distributed
from sparsecl.engine.evaluate import evaluate_all
from sparsecl.engine.graph import CapturedStep
from sparsecl.engine.io import RunDirLock, atomic_torch_save, atomic_write_json, remove_stale_temporaries
from sparsecl.engine.launch import launched_world_size
from sparsecl.engine.progress import RunProgress
from sparsecl.engine.seeding import rng_state, seed_everything, set_rng_state
from sparsecl.engine.loggers import RunObserver, check_loggers, loggers_for
from sparsecl.methods import METHODS, Batch, ContinualMethod, MethodContext
from sparsecl.metrics.accuracy import summarize
from sparsecl.metrics.efficiency import memory_footprint, peak_memory_bytes, reset_peak_memory
from sparsecl.models import build_model
from sparsecl.sparse.accounting import capacity_report, sparsity_report
from sparsecl.sparse.execution import SparseExecution
from sparsecl.sparse.kernel_choice import KernelChoices
from sparsecl.sparse.export import INFERENCE_HEAD, TASK_VIEWS, compact_task_views, method_task_views
from sparsecl.sparse.flops import CONVENTIONS as FLOP_CONVENTIONS
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


def build_method(cfg: RunConfig, stream: TaskStream, device: torch.device, augment: DeviceAugment,
                 dist: Distributed | None = None) -> ContinualMethod:
    """Model + method for ``cfg`` (checks that the method and benchmark support the setting)."""
    cls = METHODS.get(cfg.method)
    if cfg.setting not in cls.settings:
        raise SparseCLError(
            f"method {cfg.method!r} supports only {', '.join(sorted(cls.settings))}, not {cfg.setting} "
            f"(pass --setting {sorted(cls.settings)[0]})"
        )
    if cfg.setting not in stream.settings:
        raise SparseCLError(f"benchmark {cfg.benchmark!r} supports only {', '.join(sorted(stream.settings))}")
    options = build_options(cls.options_cls, dict(cfg.method_options), f"method {cfg.method!r}")
    task_classes = [t.classes for t in stream.tasks] if cfg.setting == "task-il" else None
    model = build_model(
        cfg.backbone or stream.default_backbone, stream.input_shape, stream.n_classes,
        task_classes=task_classes, **cfg.backbone_options,
    ).to(device)
    ctx = MethodContext(stream=stream, device=device, augment=augment, setting=cfg.setting,
                        batch_size=cfg.batch_size, epochs=cfg.epochs, cuda_graph=cfg.cuda_graph,
                        fused_optimizer=cfg.fused_optimizer, dist=dist)
    return cls(model, options, ctx)


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


class Trainer:
    """Runs (or resumes) one configuration end to end. See :func:`run` for the simple entry point."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, progress: bool = False, resume: bool = False,
                 dist: Distributed | None = None, observers: Sequence[RunObserver] = ()) -> None:
        """``dist``: this rank's process group under torchrun (see :func:`distributed_session`);
        every rank then builds the same seeded run, and only rank 0 writes files. ``observers``:
        told of every epoch and task on rank 0 (beside the loggers ``cfg`` asks for)."""
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.progress = progress and self.is_main
        if self.is_main:
            check_loggers(cfg)  # a missing library fails here, before any data is loaded
        if dist is None:
            self.device = resolve_device(cfg.device)
        else:  # checked before any data is loaded
            self.device = dist.select_device(cfg.device)
            check_distributed(cfg, dist.world_size)  # also covers resume and direct use
        if cfg.threads is None:  # recorded in config.yaml: a run is reproducible for its thread count
            cfg.threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)  # the same seed on every rank: identical init, orders and draws

        def load() -> TaskStream:
            stream = load_benchmark(
                cfg.benchmark, cfg.data_dir, class_order=cfg.class_order, n_tasks=cfg.n_tasks,
                root=cfg.data_root, image_size=cfg.image_size, download=cfg.download,
            )
            return hold_out_validation(stream, cfg.validation) if cfg.validation else stream

        stream = load() if dist is None else dist.everywhere(load)
        self.stream = stream.to(self.device)
        if cfg.amp and self.device.type != "cuda":
            raise SparseCLError("--amp (bf16 autocast) is supported on CUDA devices only")
        if cfg.channels_last and self.device.type != "cuda":
            # torch 2.13's CPU kernels crash (heap corruption) in the backward of a channels_last
            # strided 1x1 convolution with few input channels, e.g. a narrow ResNet's shortcut.
            raise SparseCLError("--channels-last is supported on CUDA devices only")
        if cfg.cuda_graph and self.device.type != "cuda":
            raise SparseCLError("--cuda-graph is supported on CUDA devices only")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.augment = DeviceAugment(stream.augment, stream.input_shape, memory_format=memory_format)
        self.method = build_method(cfg, self.stream, self.device, self.augment, dist)
        self.model = self.method.model
        if dist is not None and cfg.sync_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # replaces the BN submodules in place
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        if cfg.cuda_graph and not type(self.method).graph_capturable:
            raise SparseCLError(f"method {cfg.method!r} does not support --cuda-graph yet")
        if cfg.cuda_graph:
            self.augment.prepare(self.device)
        self.layers = profile_layers(self.model, stream.input_shape)
        self.flops = FlopCounter(self.layers, cfg.flop_convention)
        self.method.ctx.flops = self.flops  # sparse methods push their densities into it
        self.counter = SampleCounter(self.model, self.flops)
        self.execution = sparse_execution(cfg, self.method)  # after profiling: it bypasses module hooks
        self.method.ctx.count_samples = self.counter.add
        self.method.ctx.note_replay = self.counter.note_replay
        T = self.stream.n_tasks
        self.state: dict[str, Any] = {
            "completed": 0,
            "class_il": [[None] * T for _ in range(T)],
            "task_il": [[None] * T for _ in range(T)],
            "random_init": None,
            "train_seconds": [], "eval_seconds": [], "samples": [], "flops": [], "dense_flops": [],
            "epoch_loss": [], "peak_memory": [], "footprint": None, "max_step_samples": 0,
        }
        self.extra_observers = tuple(observers)
        self.observers: list[RunObserver] = []  # rank 0, during run(): loggers, then the caller's
        if resume:
            self._load_checkpoint()
        if self.execution is not None and self.execution.choices is not None:  # checkpointed with the state
            self.execution.choices.decisions = self.state.setdefault("kernel_choices", {})
        if dist is not None:
            self.method.net = dist.wrap(self.model)
        if cfg.compile:  # under torchrun the DDP module is compiled (dynamo splits it at its buckets)
            self.method.net = compile_net(self.method.net, cfg)

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
        cfg, method = self.cfg, self.method
        task = self.stream.tasks[task_index]
        method.begin_task(task)
        split = method.train_split(task)
        n = len(split)
        bs = cfg.batch_size
        losses = []
        bar.start_task(task_index, cfg.epochs)
        self.model.train()
        self.counter.active = True
        loss_sum = torch.zeros((), device=self.device)
        graph: CapturedStep | None = None
        # Eager steps before the capture run on a side stream, as CUDA graph capture requires.
        side = torch.cuda.Stream(self.device) if cfg.cuda_graph else None
        eager_steps = 0
        for epoch in range(cfg.epochs):
            keep = method.epoch_indices(task, epoch)
            if keep is None:
                perm = torch.randperm(n, device=self.device)
            else:  # a subset chosen by the method (data removal): shuffle it
                perm = keep[torch.randperm(int(keep.shape[0]), device=self.device)]
            n_batches = perm.shape[0] // bs if cfg.drop_last else math.ceil(perm.shape[0] / bs)
            bar.start_epoch(n_batches, self.counter.train_samples)
            loss_sum.zero_()
            b = 0
            while b < n_batches:
                idx = perm[b * bs : (b + 1) * bs]
                full = idx.shape[0] == bs
                if graph is not None and full:
                    graph.replay(idx)
                elif cfg.cuda_graph and full and eager_steps >= 3 and method.graph_ready():
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    graph = CapturedStep(lambda i: self._step(split, i, task_index), loss_sum, self.counter, method)
                    graph.capture(idx)
                else:
                    self.counter.new_step(int(idx.shape[0]))
                    if side is not None and graph is None:
                        side.wait_stream(torch.cuda.current_stream(self.device))
                        with torch.cuda.stream(side):
                            loss_sum += self._step(split, idx, task_index)
                    else:
                        loss_sum += self._step(split, idx, task_index)
                    eager_steps += 1
                self.state["max_step_samples"] = max(self.state["max_step_samples"], self.counter.step_samples)
                bar.batch_done()
                b += 1
                rest = method.epoch_rest(perm[b * bs :])
                if rest is not None:  # data removed mid-epoch: fewer steps, full batches
                    perm = torch.cat([perm[: b * bs], rest])
                    n_batches = b + (rest.shape[0] // bs if cfg.drop_last else math.ceil(rest.shape[0] / bs))
            if side is not None and graph is None:
                torch.cuda.current_stream(self.device).wait_stream(side)
            total = loss_sum
            if self.dist is not None:  # mean over ranks: the global loss, the same NaN check everywhere
                total = self.dist.all_reduce_sum_(loss_sum.clone()) / self.dist.world_size
            # One host sync per epoch. An epoch the method skipped (no batches, e.g. CL-LSG once its
            # target is met) has no loss: recorded as None, not 0.
            mean_loss = total.item() / n_batches if n_batches else None
            if mean_loss is not None and not math.isfinite(mean_loss):
                raise SparseCLError(
                    f"loss became {mean_loss} in task {task_index + 1}, epoch {epoch + 1} "
                    f"(method {cfg.method}, lr {method.options.lr}): lower the learning rate"
                )
            losses.append(mean_loss)
            if mean_loss is not None:
                for observer in self.observers:
                    observer.epoch(task_index * cfg.epochs + epoch + 1, task_index, mean_loss)
            method.end_epoch(task, epoch)
            bar.epoch_done(mean_loss, self.counter.train_samples)
        del graph  # frees the graph's memory pool before the next task captures its own
        if self.dist is not None:  # per-rank BatchNorm statistics: evaluate and save rank 0's
            self.dist.broadcast_buffers_(self.model)
        self.counter.end_steps()
        method.end_task(task)
        self.counter.active = False
        self.state["epoch_loss"].append(losses)

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
        result = self.result(complete=True)
        if self.is_main:
            atomic_write_json(self.run_dir / RESULT, result)
        return result

    def _task(self, t: int, bar: RunProgress) -> None:
        """Train task ``t``, evaluate every task, record it all, checkpoint, tell the observers."""
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
            result = self.result(complete=False)
            atomic_write_json(self.run_dir / RESULT, result)
            for observer in self.observers:
                observer.task(result, t)

    def _record_footprint(self) -> None:
        """Sparsity, capacity and memory footprint of the model as the last task left it."""
        s, method = self.state, self.method
        s["sparsity"] = sparsity_report(self.model, self.layers, method.masks, method.ownership,
                                        policy=method.mask_policy)
        s["capacity"] = capacity_report(s["sparsity"], method.masks, method.ownership, stored=method.stored_masks())
        wd, gd = method.training_densities()  # EsaCL: dense while training, pruned after
        s["footprint"] = memory_footprint(
            self.layers, self.model, max(s["max_step_samples"], 1), weight_density=wd, grad_density=gd,
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

    def _flops_result(self) -> dict[str, Any]:
        """result.json's ``flops``: the run's convention, both conventions, the selection cost."""
        s, f = self.state, self.flops
        train, dense = sum(s["flops"]), sum(s["dense_flops"])
        conventions = {}
        for c in FLOP_CONVENTIONS:
            t = f.totals(c)
            conventions[c] = {"train": t["train"], "dense_equivalent": t["dense_equivalent"],
                              "ratio": t["train"] / t["dense_equivalent"] if t["dense_equivalent"] else None}
        selection = f.selection
        return {"train": train, "dense_equivalent": dense, "ratio": train / dense if dense else None,
                "convention": f.convention, "conventions": conventions,
                "selection": {"flops": selection, "share_of_train": selection / train if train else None,
                              "samples": f.n_selection_samples},
                "replayed_samples": f.n_replay_samples,
                "per_task": s["flops"], "per_layer": f.per_layer(),
                "note": "2 FLOPs per MAC of conv/linear layers; spec: backward = 2x forward for every trained sample; "
                        "sparcl-paper: replayed samples one forward, gradient masks scale the whole backward, task-end "
                        "passes not charged; selection (importance backward passes) apart; BN and activations omitted"}

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

    def _load_checkpoint(self) -> None:
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
        try:
            self.model.load_state_dict(ckpt["model"])
            self.method.load_state_dict(ckpt["method"])
            self.method.task = int(ckpt["task"])
            self.flops.load_state_dict(ckpt["flops"])
            self.counter.load_state_dict(ckpt["counter"])
            if len(ckpt["state"]["class_il"]) != self.stream.n_tasks:
                raise ValueError(f"{len(ckpt['state']['class_il'])} tasks, not {self.stream.n_tasks}")
            set_rng_state(ckpt["rng"], self.device)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise SparseCLError(f"cannot resume: {path} does not fit the run in {self.run_dir} "
                                f"({first_line(e)[:160]})") from None
        self.state = ckpt["state"]

    # -------------------------------------------------------------- result
    def result(self, complete: bool = False) -> dict[str, Any]:
        """The run's result so far; ``complete`` only once every final file is written."""
        s, cfg = self.state, self.cfg
        done = s["completed"]
        accuracy = {}
        settings = ["class_il", "task_il"] if cfg.setting == "class-il" else ["task_il"]
        for key in settings:
            R = [row[:done] for row in s[key][:done]]
            metrics = summarize(R, s["random_init"][key][:done]) if done else {}
            accuracy[key] = {"matrix": s[key], "random_init": s["random_init"][key] if s["random_init"] else None, **metrics}
        train_s = sum(s["train_seconds"])
        return {
            "complete": complete and done == self.stream.n_tasks,
            "tasks_completed": done,
            "n_tasks": self.stream.n_tasks,
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "versions": {"sparsecl": sparsecl.__version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": sys.version.split()[0]},
            "device": describe_device(self.device),
            "threads": torch.get_num_threads(),  # results are identical for the same seed and thread count
            **({"distributed": {"world_size": self.dist.world_size, "backend": self.dist.backend,
                                "per_rank_batch": cfg.batch_size // self.dist.world_size}}
               if self.dist is not None else {}),
            "benchmark": {"name": self.stream.name, "classes_per_task": [len(t.classes) for t in self.stream.tasks],
                          "train_sizes": [len(t.train) for t in self.stream.tasks],
                          "evaluated_on": "validation" if cfg.validation else "test",
                          "eval_sizes": [len(t.test) for t in self.stream.tasks],
                          "class_order": self.stream.class_order},
            "accuracy": accuracy,
            "timing": {
                "train_seconds_per_task": s["train_seconds"], "eval_seconds_per_task": s["eval_seconds"],
                "train_seconds": train_s,
                "samples_per_second": [n / t if t > 0 else None for n, t in zip(s["samples"], s["train_seconds"])],
            },
            "samples": {"trained_per_task": s["samples"], "trained": sum(s["samples"]),
                        "forward_only": self.counter.forward_samples},
            "flops": self._flops_result(),
            "method": s.get("method") or {},
            "sparsity": s.get("sparsity"),
            "capacity": s.get("capacity"),
            "model": {"backbone": getattr(self.model, "backbone_name", cfg.backbone),
                      "backbone_options": dict(cfg.backbone_options),
                      "input_shape": list(self.stream.input_shape), "n_classes": self.stream.n_classes,
                      "task_classes": getattr(self.model, "task_classes", None)},
            "memory": {"footprint_bytes": s["footprint"], "peak_bytes_per_task": s["peak_memory"],
                       "peak_kind": "cuda max allocated" if self.device.type == "cuda" else "process peak RSS"},
            "loss_per_epoch": s["epoch_loss"],
            **({"kernel_choices": s["kernel_choices"]} if "kernel_choices" in s else {}),
        }


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
        return _train(lambda: Trainer(cfg, run_dir, progress=progress, resume=True, dist=dist, observers=observers),
                      run_dir, locks)
