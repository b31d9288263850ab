"""BatchNorm helpers shared by the methods: extra passes that must not move the running
statistics, and re-estimating the statistics of a changed (e.g. pruned) network."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


def running_bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block BatchNorm layers normalise with batch statistics (in training mode) but
    leave their running statistics as they are (momentum 0; restored after)."""
    bns = running_bns(model)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


@torch.no_grad()
def reestimate_bn_stats(model: nn.Module, inputs: Iterable[torch.Tensor]) -> bool:
    """Reset the running statistics of every BatchNorm layer and re-estimate them as the plain
    average over the batches of ``inputs`` (forward passes in training mode, no weight changes).
    Returns False, doing nothing, when ``model`` has no such layer."""
    bns = running_bns(model)
    if not bns:
        return False
    saved = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
    model.train()
    try:
        for x in inputs:
            model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)
    return True
