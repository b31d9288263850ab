"""The continual-learning method interface.

A method is a small class with hooks that the engine calls (Mammoth's ``ContinualModel`` without
global state or argparse): ``begin_task`` -> ``observe`` for every batch -> ``end_epoch`` ->
``end_task``; evaluation goes through ``eval_logits``. Its options are a typed dataclass (a subclass
of :class:`MethodOptions`) filled from presets, YAML files and CLI flags.

A training step has one shape (:meth:`ContinualMethod.observe`): ``zero_grad`` -> the method's
:meth:`~ContinualMethod.step_loss` -> :meth:`~ContinualMethod.before_backward` -> backward ->
optimiser step -> :meth:`~ContinualMethod.after_step`. A method supplies its loss; mixins (SparCL,
EsaCL) hook into the shape through what ``step_loss`` returns, never into a parent's ``observe``.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sparsecl import SparseCLError
from sparsecl.data.augment import DeviceAugment
from sparsecl.data.stream import Split, Task, TaskStream
from sparsecl.registry import Registry
from sparsecl.sparse.masks import MaskSet

if TYPE_CHECKING:  # only for annotations: the sparse core never imports methods
    from sparsecl.sparse.flops import FlopCounter
    from sparsecl.sparse.ownership import TaskOwnership

CLASS_IL = "class-il"
TASK_IL = "task-il"


@dataclass
class MethodOptions:
    """Options every method has. Subclasses add their own fields."""

    lr: float = 0.1
    optimizer: str = "sgd"  # sgd | adam | adamw
    momentum: float = 0.0
    weight_decay: float = 0.0

    def validate(self) -> None:
        if not self.lr > 0:
            raise SparseCLError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise SparseCLError(f"unknown optimizer {self.optimizer!r} (known: sgd, adam, adamw)")
        if self.momentum < 0 or self.weight_decay < 0:
            raise SparseCLError("momentum and weight_decay must be >= 0")

    @property
    def model_width(self) -> float:
        """Width the engine allocates the backbone's layers at, relative to their designed width
        (:func:`sparsecl.sparse.capacity.widen_`; 1 = as designed; CL-LSG grows past it)."""
        return 1.0


@dataclass
class Batch:
    """One training batch as the engine hands it to :meth:`ContinualMethod.observe`."""

    x: torch.Tensor  # augmented, normalised float inputs
    y: torch.Tensor  # int64 labels (global label space)
    x_raw: torch.Tensor  # the same examples as stored uint8 (non-augmented), e.g. for replay buffers
    index: torch.Tensor  # int64 position of each example in the task's training split
    task_id: int
    # Distributed training, sharded step: the whole global batch's stored inputs and labels
    # (identical on every rank; the fields above are this rank's slice). None otherwise.
    full_x_raw: torch.Tensor | None = None
    full_y: torch.Tensor | None = None


class RankView(Protocol):
    """What a method may use of its rank's process group under torchrun (``ctx.dist``); the
    engine's :class:`~sparsecl.engine.distributed.Distributed` provides it. Outside a sharded
    step ``shard`` and ``gather`` are identities."""

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global-step tensor."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's slice concatenated in rank order."""

    def broadcast_(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` with rank 0's values."""


@dataclass
class StepOutputs:
    """The forward outputs a step's loss is built from (handed to :meth:`ContinualMethod.before_backward`).
    ``*_rows``: the samples of the forward pass each block of logits came out of, i.e. what a
    backward through it traverses (a fused forward of current and buffer data traverses both)."""

    batch: Batch  # the batch the step trained on (EsaCL: its selected examples)
    current: torch.Tensor  # logits of ``batch``, in its order, whatever order the forwards ran in
    current_rows: int
    buffer: torch.Tensor | None = None  # logits of the buffer minibatch trained with labels
    buffer_y: torch.Tensor | None = None
    buffer_task: torch.Tensor | None = None
    buffer_rows: int = 0


@dataclass
class StepLoss:
    """What :meth:`ContinualMethod.step_loss` computes for one batch."""

    loss: torch.Tensor  # the total loss to minimise (cross-entropy plus replay terms, penalties...)
    outputs: StepOutputs
    # Per-example fields :meth:`ContinualMethod.after_step` stores with the batch (a replay buffer's
    # extra fields). Key ``logits``: the network's fp32 logits of the batch at the step's weights
    # (DER++), which EsaCL replaces by its selection pass's when the step trained on a subset.
    stored: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MethodContext:
    """What a method may know about the run, handed over at construction."""

    stream: TaskStream
    device: torch.device
    augment: DeviceAugment
    setting: str  # class-il | task-il
    batch_size: int
    epochs: int
    # The run's FLOP counter: methods that change weight/gradient densities push them into it
    # (MaskSet.bind_flops); SparCL charges its importance passes to it.
    flops: FlopCounter
    # Counts (train samples, forward-only samples) of model passes that the engine's forward
    # pre-hook cannot see (per-sample gradients under torch.func, backbone-only passes).
    count_samples: Callable[[int, int], None]
    # Told how many buffer samples a step drew for training (the FLOP conventions charge replayed
    # samples differently, SPEC Metrics).
    note_replay: Callable[[int], None]
    cuda_graph: bool = False  # steps are replayed from a captured CUDA graph
    fused_optimizer: bool = False  # make_optimizer builds torch's fused implementations
    # This rank's process group and step-sharding state under torchrun; None in a single process.
    dist: RankView | None = None


CAPABILITIES = ("graph_capturable", "supports_sparse_kernels", "supports_distributed", "supports_compile")


class ContinualMethod:
    """Base class: fine-tuning with cross-entropy on the current batch.

    Subclasses override hooks; each hook's default is the behaviour a plain learner needs.
    """

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    options_cls: ClassVar[type[MethodOptions]] = MethodOptions
    settings: ClassVar[frozenset[str]] = frozenset({CLASS_IL, TASK_IL})
    # Capabilities the engine reads, declared as class keywords, e.g.
    # ``class DERpp(ReplayMethod, distributed=True)`` (:meth:`__init_subclass__`):
    # - graph_capturable: observe() is CUDA-graph safe once graph_ready(): fixed shapes, no host
    #   syncs, no Python state that changes from step to step except what after_graph_replay() updates.
    # - sparse_kernels: :attr:`execution_masks` is always the whole sparsity of the network as it runs
    #   (weights outside it are zero, gradients outside :meth:`MaskSet.weight_grad_positions` are never
    #   used), so ``--sparse-kernels`` can run the masked layers on real sparse kernels.
    # - distributed: the method runs under torchrun (docs/distributed.md): its training forwards go
    #   through :attr:`net`, its buffer draws through ``ctx.dist``.
    # - compile: every training forward goes through :attr:`net`, so ``--compile`` (which makes ``net``
    #   a compiled module) covers the step; distributed methods qualify too (the same requirement).
    # The first two are inherited (mixins may set them as attributes); distributed and compile are
    # not: a subclass that changes the step must declare them again.
    graph_capturable: ClassVar[bool] = False
    supports_sparse_kernels: ClassVar[bool] = False
    supports_distributed: ClassVar[bool] = False
    supports_compile: ClassVar[bool] = False
    # Sparse methods set these (sparsecl.sparse); the engine reports per-layer densities, mask
    # bytes, the memory footprint's mask term and capacity from them. None = dense / no isolation.
    masks: MaskSet | None = None
    ownership: TaskOwnership | None = None
    mask_scope: str | None = None  # which layers the masks cover, e.g. "conv-linear" (result.json)

    def __init__(self, model: nn.Module, options: MethodOptions, ctx: MethodContext) -> None:
        self.model = model
        # The module training forwards go through: the model itself, or under torchrun its
        # DistributedDataParallel wrapper (same parameters), which averages gradients over ranks.
        self.net: nn.Module = model
        self.options = options
        self.ctx = ctx
        self.device = ctx.device
        self.task = -1
        self.optimizer: torch.optim.Optimizer | None = None
        # [n_tasks, n_classes] bool: which logits belong to which task (for Task-IL masking).
        self.class_task = ctx.stream.task_of_class().to(ctx.device)  # task index of each label
        tasks = torch.arange(ctx.stream.n_tasks, device=ctx.device)
        self._task_class_mask = self.class_task.unsqueeze(0) == tasks.unsqueeze(1)

    def __init_subclass__(cls, *, graph_capturable: bool | None = None, sparse_kernels: bool | None = None,
                          distributed: bool = False, compile: bool = False, **kwargs: Any) -> None:
        """Record the class keywords' capabilities (see the comment on the class attributes)."""
        super().__init_subclass__(**kwargs)
        in_body = [n for n in CAPABILITIES if n in vars(cls)]
        if in_body:
            raise TypeError(f"{cls.__name__}: declare {', '.join(in_body)} as class keywords, not attributes")
        if graph_capturable is not None:
            cls.graph_capturable = graph_capturable
        if sparse_kernels is not None:
            cls.supports_sparse_kernels = sparse_kernels
        cls.supports_distributed = distributed
        cls.supports_compile = compile or distributed

    @property
    def execution_masks(self) -> MaskSet | None:
        """The masks the network runs under right now, for ``--sparse-kernels`` (``None``: dense):
        :attr:`masks` by default; per-task views and phases with their own masks override it."""
        return self.masks

    # ------------------------------------------------------------------ hooks
    def begin_task(self, task: Task) -> None:
        """Called before the first epoch of ``task``; SPEC: the optimizer is re-created per task."""
        self.task = task.index
        self.optimizer = self.make_optimizer()

    def train_split(self, task: Task) -> Split:
        """The data the engine iterates over for ``task`` (Joint overrides this)."""
        return task.train

    def epoch_indices(self, task: Task, epoch: int) -> torch.Tensor | None:
        """Positions in :meth:`train_split` to train on in ``epoch`` (a device int64 tensor, the
        engine shuffles them), or None for all of them. Data-removal methods (SparCL's DDR) shrink
        it between epochs; the examples left out are never seen by :meth:`observe`."""
        return None

    def observe(self, batch: Batch) -> torch.Tensor:
        """One training step; returns the detached loss as a device tensor (no host sync). The
        shape every method on :meth:`step_loss` shares: gradients, optimiser step, after-step."""
        step = self.compute_gradients(batch)
        self.optimizer.step()
        self.after_step(batch, step)
        return step.loss.detach()

    def compute_gradients(self, batch: Batch) -> StepLoss:
        """``zero_grad``, :meth:`step_loss`, :meth:`before_backward`, backward: one step's gradients,
        not yet applied (EsaCL computes two per SAM step and steps its optimiser itself)."""
        self.optimizer.zero_grad(set_to_none=True)
        step = self.step_loss(batch)
        self.before_backward(step.outputs)
        step.loss.backward()
        return step

    def step_loss(self, batch: Batch) -> StepLoss:
        """The method's loss on ``batch`` with the forward outputs it came from (default:
        cross-entropy of the current batch). Buffer draws happen here; no backward, no update."""
        out = self.net(batch.x)
        return StepLoss(self.loss(out, batch.y, batch.task_id), StepOutputs(batch, out, batch.y.shape[0]))

    def after_step(self, batch: Batch, step: StepLoss) -> None:
        """After the optimiser step: ``batch`` is the whole batch :meth:`observe` was handed, ``step``
        what :meth:`step_loss` returned for it (or for a subset of it: EsaCL's selection). Replay
        methods offer the batch to their buffer with ``step.stored``; the default does nothing."""

    def epoch_rest(self, rest: torch.Tensor) -> torch.Tensor | None:
        """After each step: the positions still to train on in this epoch when the method removed
        some of ``rest`` mid-epoch (SparCL's DDR; the epoch then has fewer full batches), else
        None (the default; no device work)."""
        return None

    def before_backward(self, step: StepOutputs) -> None:
        """Called with the outputs the step's loss is built from, before its backward (SparCL takes
        its importance gradients from this graph instead of extra passes, and counts its DDR
        misclassifications from ``step.current``)."""

    def draw_sizes(self) -> list[int]:
        """Global sizes of the buffer draws the next :meth:`observe` makes (replay methods); the
        engine shards a distributed step only when all of them split evenly over the ranks."""
        return []

    def graph_ready(self) -> bool:
        """Whether the next step's control flow is the steady state that a graph can capture."""
        return True

    def after_graph_replay(self, batch_size: int) -> None:
        """Host-side bookkeeping for a step that ran as a graph replay (no Python ran)."""

    def end_epoch(self, task: Task, epoch: int) -> None:
        """Called after each epoch of ``task``."""

    def end_task(self, task: Task) -> None:
        """Called after the last epoch of ``task``, before evaluation."""

    def eval_logits(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        """Logits over the global label space used for evaluation of task ``task_id``'s data."""
        return self.model(x)

    def evaluation(self) -> ContextManager[None]:
        """Context around one evaluation pass over all tasks: methods that swap weights per task
        (parameter isolation) restore the training state when it exits."""
        return nullcontext()

    # ------------------------------------------------------------- utilities
    def count_samples(self, train: int = 0, forward: int = 0) -> None:
        """Account for model passes the engine's forward pre-hook does not see. Ordinary
        ``self.model(x)`` calls are counted automatically: never both."""
        self.ctx.count_samples(train, forward)

    def make_optimizer(self, params: Any = None) -> torch.optim.Optimizer:
        params = self.model.parameters() if params is None else params
        o = self.options
        # Passed only when asked for: the default stays torch's (foreach), and older torch
        # versions without a fused SGD still run.
        fused = {"fused": True} if self.ctx.fused_optimizer else {}
        if o.optimizer == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **fused)
        # Adam's step counter must live on the device when the step is a graph replay.
        cap = self.ctx.cuda_graph
        if o.optimizer == "adam":
            return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, capturable=cap, **fused)
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, capturable=cap, **fused)

    def mask_logits(self, logits: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """Set logits of classes outside each sample's task to -inf (Task-IL training)."""
        if isinstance(task_ids, int):
            keep = self._task_class_mask[task_ids].expand_as(logits)
        else:
            keep = self._task_class_mask[task_ids]
        return logits.masked_fill(~keep, float("-inf"))

    def loss(self, logits: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor | int) -> torch.Tensor:
        """Cross-entropy; in the Task-IL setting restricted to each sample's task logits."""
        if self.ctx.setting == TASK_IL:
            logits = self.mask_logits(logits, task_ids)
        return F.cross_entropy(logits, y)

    def task_view(self, task_id: int) -> dict[str, torch.Tensor] | None:
        """The model state with which a plain forward of the backbone gives :meth:`eval_logits` of
        task ``task_id`` (for the export of per-task subnetworks), or ``None`` when one model serves
        every task (the default). Methods that switch weights per task at evaluation implement it."""
        return None

    def inference_head(self) -> dict[str, Any] | None:
        """The classifier :meth:`eval_logits` applies instead of the model's own head, for the export
        (``{"kind": ..., tensors}``), or ``None`` when the model's logits are the classifier (the
        default). iCaRL returns its class means (``kind`` ``nearest-mean``)."""
        return None

    def training_densities(self) -> tuple[float | None, float | None]:
        """``(1 - s, 1 - (s + q))`` over all parameters while training, for the memory footprint:
        from the masks in force (the default), ``(None, None)`` to measure the weights (dense runs)."""
        from sparsecl.sparse.accounting import parameter_densities

        return parameter_densities(self.model, self.masks)

    def memory_bytes(self) -> int:
        """Bytes of the examples the method stores (a replay buffer, exemplars), for the footprint."""
        return 0

    def stored_masks(self) -> tuple[int, int] | None:
        """``(number, bytes)`` of the masks the method keeps, for capacity (EsaCL eq. 6.24), when
        its :attr:`masks` are not what it stores; ``None`` (default): counted from the masks."""
        return None

    def report(self) -> dict[str, Any]:
        """JSON-safe method-specific results, stored under ``result.json`` ``"method"`` after every
        task (e.g. per-stage data counts, backbone usage per task, model size per task)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra method state to checkpoint after a task (buffers, old models...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def restore(self, state: dict[str, Any], task: int) -> None:
        """Continue from a checkpoint written after task index ``task`` (its :meth:`state_dict`)."""
        self.load_state_dict(state)
        self.task = task


METHODS: Registry[type[ContinualMethod]] = Registry("method")


def task_heads(model: nn.Module, method: str) -> nn.ModuleList:
    """The per-task heads of ``model`` (a MultiHead's); one clear error for a shared head (Class-IL)."""
    heads = getattr(model.head, "heads", None)
    if heads is None:
        raise SparseCLError(f"{method} needs per-task heads (run it with --setting task-il)")
    return heads


class TaskSubnetworks:
    """Mixin for methods that evaluate task j through its own subnetwork (PackNet, continual DST,
    CL-LSG, scratch). :meth:`evaluation` saves the live tensors that views overwrite
    (:meth:`_view_tensors`) in ``self._saved`` and restores them on exit; the method's
    ``_use_task(j)`` loads task j's view into the model and sets ``self._view = j``. This gives
    :meth:`eval_logits` and the export's :meth:`task_view`."""

    _saved: dict[str, torch.Tensor] | None
    _view: int | None
    _view_masks: tuple[int | None, MaskSet] | None = None  # (view, its nonzero weights) for sparse kernels
    shared_names: list[str]  # parameters/buffers every task trains (biases, BN...), per-task copies

    head_params: dict[int, list[str]]  # parameter names of each task's head

    def split_task_heads(self, model: nn.Module, isolated: Iterable[str] = ()) -> None:
        """Set :attr:`head_params` and :attr:`shared_names` (every parameter neither ``isolated`` nor
        a head's, and every buffer); one clear error without per-task heads (Class-IL)."""
        heads = task_heads(model, self.name)
        self.head_params = {t: [f"head.heads.{t}.{n}" for n, _ in h.named_parameters()] for t, h in enumerate(heads)}
        apart = set(isolated) | {n for names in self.head_params.values() for n in names}
        self.shared_names = [n for n, _ in model.named_parameters() if n not in apart]
        self.shared_names += [n for n, _ in model.named_buffers()]

    def frozen_heads(self, task: int) -> dict[str, torch.Tensor]:
        """All-True frozen masks of the heads of the tasks before ``task`` (finished, never trained again)."""
        params = dict(self.model.named_parameters())
        return {n: torch.ones_like(params[n], dtype=torch.bool) for t in range(task) for n in self.head_params[t]}

    def _view_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors a task view overwrites (saved when evaluation starts, restored after)."""
        raise NotImplementedError

    def _views_active(self, active: bool) -> None:
        """Called as evaluation starts (True) and ends (False), e.g. CL-LSG's gates to eval mode."""

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        live = self._view_tensors()
        self._saved = {n: v.detach().clone() for n, v in live.items()}
        self._view, self._view_masks = None, None
        self._views_active(True)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in live.items():
                    v.copy_(self._saved[n])
            self._views_active(False)
            self._saved, self._view, self._view_masks = None, None, None

    @property
    def execution_masks(self) -> MaskSet | None:
        """Inside :meth:`evaluation`: the nonzero weights of the loaded view (exact for any view,
        whatever the method stores); otherwise the training masks."""
        if self._saved is None:
            return super().execution_masks
        if self._view_masks is None or self._view_masks[0] != self._view:
            convs = {f"{n}.weight" for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
            names = [n for n in self._view_tensors() if n in convs]
            self._view_masks = (self._view, MaskSet.from_nonzero(self.model, names))
        return self._view_masks[1]

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the model by name (the live tensors)."""
        return {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    def _shared_state(self) -> dict[str, torch.Tensor]:
        tensors = self._model_tensors()
        return {n: tensors[n] for n in self.shared_names}

    def eval_logits(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        """Logits of task ``task_id``'s subnetwork (inside ``evaluation()``)."""
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.eval_logits must run inside evaluation()")
        if self._view != task_id:
            self._use_task(task_id)
        return self.model(x)

    def task_view(self, task_id: int) -> dict[str, torch.Tensor]:
        """Task ``task_id``'s subnetwork as a plain state dict (for the export)."""
        with self.evaluation():
            self._use_task(task_id)
            return self._view_state()

    def _view_state(self) -> dict[str, torch.Tensor]:
        """The loaded view as a state dict (CL-LSG bakes its gates in here)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def register_method(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Class decorator: register a method under ``cls.name``."""
    METHODS.add(cls.name, cls)
    return cls
