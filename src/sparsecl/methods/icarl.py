"""iCaRL: Incremental Classifier and Representation Learning (``icarl``).

Rebuffi, Kolesnikov, Sperl & Lampert, CVPR 2017. Class-incremental by design.

* **Exemplar memory** of fixed total size ``buffer_size``, split evenly over the classes seen so
  far (``m = buffer_size // n_seen`` per class). At the end of each task the old classes keep their
  first ``m`` exemplars (herding order is priority order) and each new class gets ``m`` exemplars
  chosen by *herding*: greedily, the example that brings the mean of the chosen exemplars' features
  closest to the class mean (L2-normalised features, without replacement).
* **Training** at task ``t`` runs on the task's data together with all exemplars. The loss, as in
  the paper and Mammoth's ``icarl``, is a sigmoid binary cross-entropy over the classes seen so far:
  one-hot targets for the new classes (classification) and, for the old classes, the sigmoid outputs
  of the model frozen at the end of the previous task (distillation). ``temperature`` divides both
  the old model's and the current model's old-class logits in that term; 1 (default) is the paper
  and Mammoth, the seq-cifar10 preset uses SPEC's T 2.
* **Classification** is nearest-mean-of-exemplars: ``eval_logits`` returns minus the Euclidean
  distance between the normalised feature of ``x`` and each seen class's mean exemplar feature
  (mean of normalised features, renormalised), ``-inf`` for classes not seen yet. Before the first
  task ends there are no means and the network's own logits are used.

Choices where the papers leave room: class means are computed from the exemplars only (the paper;
its extra horizontally flipped copies are not used, as in Mammoth), in eval mode, right after
herding at ``end_task``. Herding and class-mean passes are counted as forward-only samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparsecl import SparseCLError
from sparsecl.data.stream import Split, Task
from sparsecl.methods.base import (
    CLASS_IL, Batch, ContinualMethod, MethodOptions, StepLoss, StepOutputs, register_method,
)
from sparsecl.methods.teacher import FrozenCopy
from sparsecl.models.heads import nearest_mean_logits


@dataclass
class ICaRLOptions(MethodOptions):
    lr: float = 0.1
    weight_decay: float = 1e-5
    buffer_size: int = 500  # total exemplars, split evenly over the classes seen so far
    temperature: float = 1.0  # divides old-class logits in the distillation term (1 = paper)
    feature_batch_size: int = 512  # examples per forward when extracting features for herding/means

    def validate(self) -> None:
        super().validate()
        if self.buffer_size < 0:
            raise SparseCLError(f"buffer size must be >= 0, got {self.buffer_size}")
        if not self.temperature > 0:
            raise SparseCLError(f"temperature must be > 0, got {self.temperature}")
        if self.feature_batch_size < 1:
            raise SparseCLError(f"feature_batch_size must be >= 1, got {self.feature_batch_size}")


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` rows of ``features`` [n, d] chosen by iCaRL's herding, in selection order.

    Step ``k`` picks, among rows not chosen yet, the one that minimises
    ``|| mean(features) - (sum of chosen + candidate) / k ||``. Runs on the device, no host sync.
    """
    n = features.shape[0]
    m = min(m, n)
    mu = features.mean(0)
    running = torch.zeros_like(mu)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    chosen = torch.empty(m, dtype=torch.long, device=features.device)
    for k in range(m):
        cost = (mu - (running + features) / (k + 1)).pow(2).sum(1)
        i = cost.masked_fill(taken, float("inf")).argmin()
        chosen[k] = i
        taken.index_fill_(0, i.view(1), True)  # tensor indices: no host sync
        running = running + features.index_select(0, i.view(1))[0]
    return chosen


class ExemplarMemory:
    """The exemplars (non-augmented uint8 inputs), their labels and herding rank within their class."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = int(capacity)
        self.device = device
        self.x: torch.Tensor | None = None
        self.y = torch.zeros(0, dtype=torch.long, device=device)
        self.rank = torch.zeros(0, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def keep_first(self, m: int) -> None:
        """Keep the first ``m`` exemplars of every class (the memory shrinks as classes arrive)."""
        if self.x is None:
            return
        keep = self.rank < m
        self.x, self.y, self.rank = self.x[keep], self.y[keep], self.rank[keep]

    def add(self, x: torch.Tensor, y: torch.Tensor, rank: torch.Tensor) -> None:
        self.x = x if self.x is None else torch.cat([self.x, x])
        self.y = torch.cat([self.y, y])
        self.rank = torch.cat([self.rank, rank])

    def nbytes(self) -> int:
        """Bytes of a full memory (what the footprint report charges for it)."""
        if self.x is None:
            return 0
        per = self.x[0].numel() * self.x.element_size() + 2 * self.y.element_size()
        return self.capacity * per

    def state_dict(self) -> dict:
        return {"x": None if self.x is None else self.x.cpu(), "y": self.y.cpu(), "rank": self.rank.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.x = None if state["x"] is None else state["x"].to(self.device)
        self.y, self.rank = state["y"].to(self.device), state["rank"].to(self.device)


@register_method
class ICaRL(ContinualMethod):
    """Herding exemplars, sigmoid classification + distillation loss, nearest-mean-of-exemplars."""

    name = "icarl"
    description = "iCaRL (Rebuffi et al. 2017): herding exemplars, BCE + distillation, nearest-mean classifier"
    options_cls = ICaRLOptions
    settings = frozenset({CLASS_IL})

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        n_classes = ctx.stream.n_classes
        if options.buffer_size < n_classes:
            raise SparseCLError(
                f"icarl needs at least one exemplar per class: buffer_size {options.buffer_size} < {n_classes} classes"
            )
        self.buffer = ExemplarMemory(options.buffer_size, self.device)
        self.teacher = FrozenCopy(model)
        self.class_means = torch.zeros(n_classes, model.feature_dim, device=self.device)
        self.seen = torch.zeros(n_classes, dtype=torch.bool, device=self.device)
        self.has_means = False

    # -------------------------------------------------------------- training
    def memory_bytes(self) -> int:
        return self.buffer.nbytes()

    def train_split(self, task: Task) -> Split:
        if len(self.buffer) == 0:
            return task.train
        return Split(torch.cat([task.train.x, self.buffer.x]), torch.cat([task.train.y, self.buffer.y]))

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self._cols = torch.nonzero(self.class_task <= task.index).squeeze(1)  # classes seen so far
        self._old = (self.class_task[self._cols] < task.index).unsqueeze(0)  # [1, n_seen]: old among them

    def step_loss(self, batch: Batch) -> StepLoss:
        out = self.model(batch.x)
        logits = out[:, self._cols].float()
        targets = F.one_hot(batch.y, self.ctx.stream.n_classes)[:, self._cols].float()
        if self.teacher.ready:
            T = self.options.temperature
            old = torch.sigmoid(self.teacher(batch.x)[:, self._cols].float() / T)
            targets = torch.where(self._old, old, targets)
            if T != 1:
                logits = torch.where(self._old, logits / T, logits)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        return StepLoss(loss, StepOutputs(batch, out, batch.y.shape[0]))

    # ---------------------------------------------------------------- memory
    @torch.no_grad()
    def features(self, x_raw: torch.Tensor) -> torch.Tensor:
        """L2-normalised features of uint8 inputs (eval transform), in chunks; counted as forwards."""
        bs = self.options.feature_batch_size
        out = [self.model.features(self.ctx.augment.eval(x_raw[i : i + bs])).float() for i in range(0, len(x_raw), bs)]
        self.count_samples(forward=len(x_raw))
        return F.normalize(torch.cat(out), dim=1)

    def end_task(self, task: Task) -> None:
        self.teacher.snapshot()
        was_training = self.model.training
        self.model.eval()
        try:
            n_seen = sum(len(t.classes) for t in self.ctx.stream.tasks[: task.index + 1])
            m = self.options.buffer_size // n_seen
            self.buffer.keep_first(m)
            feats = self.features(task.train.x)
            for c in task.classes:
                idx = torch.nonzero(task.train.y == c).squeeze(1)
                if idx.numel() == 0:
                    continue
                pick = idx[herding(feats[idx], m)]
                self.buffer.add(task.train.x[pick], task.train.y[pick], torch.arange(pick.numel(), device=self.device))
            self.compute_class_means()
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def compute_class_means(self) -> None:
        """Mean normalised exemplar feature of every class in memory, renormalised."""
        feats = self.features(self.buffer.x)
        n_classes = self.class_means.shape[0]
        sums = torch.zeros_like(self.class_means).index_add_(0, self.buffer.y, feats)
        counts = torch.bincount(self.buffer.y, minlength=n_classes)
        self.seen = counts > 0
        self.class_means = F.normalize(sums / counts.clamp_min(1).unsqueeze(1), dim=1)
        self.has_means = True

    # ------------------------------------------------------------ evaluation
    def eval_logits(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        if not self.has_means:
            return self.model(x)
        return nearest_mean_logits(self.model.features(x), self.class_means, self.seen)

    def inference_head(self) -> dict[str, Any] | None:
        if not self.has_means:
            return None
        return {"kind": "nearest-mean", "class_means": self.class_means.cpu(), "seen": self.seen.cpu()}

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "memory": self.buffer.state_dict(), "teacher": self.teacher.state_dict(),
            "class_means": self.class_means.cpu(), "seen": self.seen.cpu(), "has_means": self.has_means,
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["memory"])
        self.teacher.load_state_dict(state["teacher"])
        self.class_means = state["class_means"].to(self.device)
        self.seen = state["seen"].to(self.device)
        self.has_means = bool(state["has_means"])
