"""Extra training passes a method runs itself, beyond the engine's epochs of a task (NISPA's later
phases, DEN's selective/expansion/split stages, CPG's growing, pruning and retraining), the
validation accuracy that decides between them, and snapshots to roll a stage back.

:func:`run_epochs` goes through :meth:`ContinualMethod.observe` with augmented batches, as the
engine does, so every pass is charged to the run's FLOP counter by the engine's forward hook.
"""
from __future__ import annotations

import torch

from sparsecl.data.stream import Split
from sparsecl.methods.base import Batch, ContinualMethod
from sparsecl.methods.scratch import task_il_accuracy
from sparsecl.sparse.masks import MaskSet


def run_epochs(method: ContinualMethod, split: Split, task_id: int, epochs: int) -> torch.Tensor:
    """Train ``method`` on ``split`` for ``epochs`` shuffled epochs; returns the mean loss of the
    last epoch (a device tensor; zero for ``epochs == 0``)."""
    bs, aug = method.ctx.batch_size, method.ctx.augment
    total = torch.zeros((), device=method.device)
    for _ in range(epochs):
        total = torch.zeros((), device=method.device)
        perm = torch.randperm(len(split), device=method.device)
        for start in range(0, len(split), bs):
            idx = perm[start:start + bs]
            x_raw, y = split.x[idx], split.y[idx]
            total += method.observe(Batch(aug.train(x_raw), y, x_raw, idx, task_id)) * len(idx)
    return total / max(len(split), 1)


def split_accuracy(method: ContinualMethod, split: Split, classes: torch.Tensor) -> float:
    """Accuracy (percent) of ``method.model`` on ``split``, argmax over ``classes`` only (Task-IL: the
    task's classes; Class-IL: the classes seen so far), in eval mode (the mode is restored)."""
    was = method.model.training
    method.model.eval()
    acc = task_il_accuracy(method.model, split, classes, method.ctx.augment)
    method.model.train(was)
    return acc


def snapshot(params: dict[str, torch.Tensor], masks: MaskSet, extra: dict[str, torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
    """Copies of the parameters, the masks and ``extra`` tensors (a state to roll back to)."""
    state = {n: p.detach().clone() for n, p in params.items()}
    state.update({f"mask:{n}": m.clone() for n, m in masks.items()})
    state.update({f"extra:{n}": t.detach().clone() for n, t in (extra or {}).items()})
    return state


@torch.no_grad()
def restore_(state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], masks: MaskSet,
             extra: dict[str, torch.Tensor] | None = None) -> None:
    """Roll back to a :func:`snapshot` (in place: optimisers and hooks keep their tensors)."""
    for n, p in params.items():
        p.copy_(state[n])
    for n in masks.names:
        masks.set_mask(n, state[f"mask:{n}"])
    for n, t in (extra or {}).items():
        t.copy_(state[f"extra:{n}"])
