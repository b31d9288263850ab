"""Progressive Neural Networks (``pnn``, Rusu et al., "Progressive neural networks", arXiv 1606.04671,
2016), Task-IL.

Task ``k`` gets a new *column*, a freshly initialised copy of the backbone with its own head; the
columns of tasks ``< k`` are frozen (never updated again: not in the optimiser, run without
gradients and in eval mode) and feed the new one through *lateral connections* (Rusu eq. 2,
with the adapters of section 2):

    h_i^(k) = f( W_i^(k) h_(i-1)^(k) + U_i^(k) relu( V_i^(k) (alpha_i^(k) * [h_(i-1)^(j) for j < k]) ) )

for every weight layer ``i >= 2`` of the column and for its output layer (the task head).
``alpha`` scales each input unit (channel, for convolutions), ``V`` reduces the concatenated
activations of the earlier columns back to one column's width (a 1x1 convolution for conv layers,
as the paper), ``U`` maps them like ``W`` (same kernel, stride and padding, no bias). Task ``j``
is evaluated with column ``j`` and the columns it reads, so nothing is forgotten (BWT exactly 0).

Choices where the paper is silent, from Mammoth's PNN (``models/pnn.py``, ``backbone/MNISTMLP_PNN.py``,
the DER paper's PNN; Rusu et al. released no code): full-size columns; ``V`` has a bias and ``U``
none; ``alpha`` one value per input unit, initialised uniformly in [0, 0.1); the laterals enter
before the layer's nonlinearity (and before its BatchNorm, where there is one). Mammoth's MLP
column never uses its laterals (``self.old_cols`` stays empty), ours always does: a test fails if
they are cut.

Backbones: sequential ones whose weight layers run in the order they are registered (mlp, lenet,
vgg16bn, vgg-like); residual networks are refused in one line. Column 1 is the model's own
backbone (so ``model.pt`` holds task 1's column), later columns and the laterals live in the method
and its checkpoints. ``sparsecl export`` refuses a pnn run in one line: the export's per-task views
are whole-backbone state dicts and cannot hold a column with its laterals.

Model size (``result.json`` -> ``method``, in units of one backbone's conv/linear weights, heads
excluded as in CL-LSG's tables): ``size_total[t]`` = all columns and laterals after task ``t``,
``size_task[j]`` = what task ``j``'s forward uses (columns ``<= j`` and their laterals). FLOPs: the
new column's samples are training samples and each earlier column's forward-only samples (counted
exactly through the engine); the lateral adapters are not profiled layers of the model, so their
cost is reported beside it (``lateral_train_flops``, same convention: 6 FLOPs per multiply-add for
the trained laterals, 2 for the frozen ones), not inside the engine's total.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.base import TASK_IL, ContinualMethod, MethodOptions, register_method, task_heads

_WEIGHTED = (nn.Linear, nn.Conv2d)


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The modules without children of ``module``, in registration order."""
    children = list(module.children())
    return [module] if not children else [m for c in children for m in _leaves(c)]


def column_blocks(backbone: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[nn.Module], list[list[nn.Module]]]:
    """``(prefix, blocks)``: the parameter-free modules before the first weight layer and, per
    weight layer, ``[layer, modules up to the next weight layer...]``. Raises SparseCLError when
    running them in this order does not reproduce ``backbone``'s output."""
    leaves = _leaves(backbone)
    if any(list(m.parameters()) and not isinstance(m, (*_WEIGHTED, nn.BatchNorm1d, nn.BatchNorm2d)) for m in leaves):
        raise SparseCLError("pnn needs a backbone of linear/conv layers, BatchNorm and parameter-free modules")
    first = next(i for i, m in enumerate(leaves) if isinstance(m, _WEIGHTED))
    prefix, blocks = leaves[:first], []
    for m in leaves[first:]:
        if isinstance(m, _WEIGHTED):
            blocks.append([m])
        else:
            blocks[-1].append(m)
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        x = torch.randn(2, *input_shape, device=next(backbone.parameters()).device)
        try:
            h = x
            for m in prefix + [m for b in blocks for m in b]:
                h = m(h)
            same = h.shape == backbone(x).shape and torch.allclose(h, backbone(x))
        except RuntimeError:  # e.g. a residual block's layers do not chain in registration order
            same = False
    backbone.train(was)
    if not same:
        raise SparseCLError(f"pnn needs a sequential backbone (mlp, lenet, vgg16bn, vgg-like); "
                            f"{type(backbone).__name__}'s forward is not its layers in order")
    return prefix, blocks


class Lateral(nn.Module):
    """Adapter ``U relu(V (alpha * h))`` from the earlier columns' activations ``h`` into one layer.

    Args:
        layer: the weight layer the adapter feeds (``U`` copies its geometry).
        n_old: number of earlier columns.
        out_features: width of the target (the layer's output, or a head's classes).
    """

    def __init__(self, layer: nn.Module, n_old: int, out_features: int | None = None) -> None:
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            c = layer.in_channels
            self.alpha = nn.Parameter(torch.rand(1, c * n_old, 1, 1) * 0.1)
            self.v = nn.Conv2d(c * n_old, c, 1)
            self.u = nn.Conv2d(c, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                               layer.dilation, bias=False)
        else:
            f = layer.in_features
            self.alpha = nn.Parameter(torch.rand(1, f * n_old) * 0.1)
            self.v = nn.Linear(f * n_old, f)
            self.u = nn.Linear(f, out_features or layer.out_features, bias=False)

    def forward(self, old: list[torch.Tensor]) -> torch.Tensor:
        return self.u(torch.relu(self.v(torch.cat(old, dim=1) * self.alpha)))


def _reset(module: nn.Module) -> None:
    """Fresh random weights (each layer's own ``reset_parameters``, drawn from torch's RNG)."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _weights(module: nn.Module) -> int:
    """Number of conv/linear weights (biases, BatchNorm and alphas left out, as model size)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, _WEIGHTED))


@dataclass
class PNNOptions(MethodOptions):
    lr: float = 0.1


@register_method
class PNN(ContinualMethod):
    """A new column per task reading every earlier (frozen) column through lateral adapters."""

    name = "pnn"
    description = "PNN: a column per task, lateral connections from all frozen earlier columns (Task-IL, size grows)"
    options_cls = PNNOptions
    settings = frozenset({TASK_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        task_heads(model, self.name)
        self.input_shape = tuple(ctx.stream.input_shape)
        column_blocks(model.backbone, self.input_shape)  # refuse unsupported backbones up front
        self.template = copy.deepcopy(model.backbone)  # new columns: this structure, fresh weights
        self.columns = nn.ModuleList([model.backbone])
        self.laterals = nn.ModuleList([nn.ModuleList()])  # per column: one adapter per block >= 2, then the head's
        self._blocks = [column_blocks(model.backbone, self.input_shape)]
        self.unit = _weights(model.backbone)
        self.lateral_flops = 0  # training FLOPs of the adapters (outside the engine's count)
        head_index = model.head.task_classes
        self._classes = [torch.as_tensor(c, dtype=torch.long, device=ctx.device) for c in head_index]

    # ------------------------------------------------------------------ columns
    def _add_column(self) -> None:
        k = len(self.columns)
        column = copy.deepcopy(self.template)
        _reset(column)
        prefix, blocks = column_blocks(column, self.input_shape)
        adapters = [Lateral(b[0], k) for b in blocks[1:]]
        head = self.model.head.heads[k]
        adapters.append(Lateral(nn.Linear(self.model.feature_dim, head.out_features), k))
        self.columns.append(column.to(self.device))
        self.laterals.append(nn.ModuleList(adapters).to(self.device))
        self._blocks.append((prefix, blocks))

    def _lateral_macs(self, k: int) -> int:
        """Multiply-adds per sample of column ``k``'s adapters (profiled on a dummy pass)."""
        macs = [0]

        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            per_out = m.in_features if isinstance(m, nn.Linear) else m.in_channels * math.prod(m.kernel_size)
            macs[0] += out[0].numel() * per_out
        handles = [m.register_forward_hook(hook) for m in self.laterals[k].modules() if isinstance(m, _WEIGHTED)]
        was = self.model.training
        self.model.eval()  # no BatchNorm statistics from the dummy input
        try:
            with torch.no_grad():
                self.column_logits(torch.zeros(1, *self.input_shape, device=self.device), k)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was)
        return macs[0]

    def column_logits(self, x: torch.Tensor, k: int, head: int | None = None) -> torch.Tensor:
        """Logits of column ``k`` with its laterals from columns ``< k`` through task ``head``'s
        head (default ``k``; global label space, other tasks' positions 0), computed column by
        column, the earlier ones without gradients."""
        head = k if head is None else head
        acts: list[list[torch.Tensor]] = []  # per column: the output of each block
        for j in range(k + 1):
            self.columns[j].train(j == k and self.model.training)
            with torch.set_grad_enabled(torch.is_grad_enabled() and j == k):
                acts.append(self._column(x, j, acts))
        logits = self.model.head.heads[head](acts[k][-1])
        if k > 0 and head == k:
            logits = logits + self.laterals[k][-1]([acts[c][-1] for c in range(k)])
        out = logits.new_zeros(x.shape[0], self.model.n_classes)
        return out.index_copy(1, self._classes[head], logits)

    def _column(self, x: torch.Tensor, j: int, acts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Every block's output of column ``j``, its laterals reading ``acts`` of columns ``< j``."""
        prefix, blocks = self._blocks[j]
        h = x
        for m in prefix:
            h = m(h)
        outs = []
        for i, block in enumerate(blocks):
            h = block[0](h)
            if j > 0 and i > 0:
                h = h + self.laterals[j][i - 1]([acts[c][i - 1] for c in range(j)])
            for m in block[1:]:
                h = m(h)
            outs.append(h)
        return outs

    # ------------------------------------------------------------------ hooks
    def begin_task(self, task: Task) -> None:
        self.task = task.index
        while len(self.columns) <= task.index:
            self._add_column()
        k = task.index
        params = [*self.columns[k].parameters(), *self.laterals[k].parameters(), *self.model.head.heads[k].parameters()]
        self.optimizer = self.make_optimizer(params)
        self._macs = [self._lateral_macs(j) for j in range(k + 1)]

    def observe(self, batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        k = batch.task_id
        loss = self.loss(self.column_logits(batch.x, k), batch.y, k)
        loss.backward()
        self.optimizer.step()
        n = int(batch.y.shape[0])
        self.count_samples(train=n, forward=k * n)  # new column trained, earlier ones forward only
        self.lateral_flops += n * (6 * self._macs[k] + 2 * sum(self._macs[:k]))
        return loss.detach()

    def eval_logits(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        """Task ``task_id``'s column (a task not trained yet: the newest column through its head)."""
        return self.column_logits(x, min(task_id, len(self.columns) - 1), task_id)

    # ------------------------------------------------------------------ reporting
    def report(self) -> dict:
        done = max(self.task + 1, 0)
        per_column = [_weights(self.columns[j]) + _weights(self.laterals[j]) for j in range(done)]
        used = [sum(per_column[: j + 1]) / self.unit for j in range(done)]
        return {"size_task": [round(u, 6) for u in used], "size_total": [round(u, 6) for u in used],
                "model_size": round(used[-1], 6) if used else 0.0,
                "size_unit": "one backbone's conv/linear weights (laterals included, heads excluded)",
                "lateral_train_flops": float(self.lateral_flops),
                "export_unsupported": "pnn's task j runs columns <= j and their laterals, more than the "
                                      "export's one backbone holds"}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"columns": [c.state_dict() for c in self.columns[1:]],
                "laterals": [l.state_dict() for l in self.laterals[1:]],
                "lateral_flops": torch.tensor(self.lateral_flops, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        while len(self.columns) <= len(state["columns"]):
            self._add_column()
        for j, (c, l) in enumerate(zip(state["columns"], state["laterals"]), start=1):
            self.columns[j].load_state_dict(c)
            self.laterals[j].load_state_dict(l)
        self.lateral_flops = float(state["lateral_flops"])
