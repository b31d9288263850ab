"""A whole training step (batch gather, augmentation, forward, backward, optimizer step, replay
buffer insert) captured once in a CUDA graph and replayed for every later full batch of the task.

At batch 32 a ResNet-18 step is bound by kernel launches, not arithmetic; a replay launches the
whole step at once. Everything that varies per step lives in device tensors: the batch indices
are copied into a static index tensor, randomness comes from the graph-aware CUDA generator and
the replay buffer keeps its counters on the device. Python side effects that a replay cannot run
(sample and FLOP counting, the buffer's host-side count) are re-applied by :meth:`replay`.
"""
from __future__ import annotations

from typing import Callable

import torch


class CapturedStep:
    """Capture ``step(idx) -> loss`` once, then replay it with new indices."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], loss_sum: torch.Tensor, counter, method) -> None:
        self.step = step
        self.loss_sum = loss_sum
        self.counter = counter
        self.method = method
        self.graph: torch.cuda.CUDAGraph | None = None
        self.idx: torch.Tensor | None = None
        self.batch_size = 0
        self._train = self._fwd = self._replay = self._step_samples = 0

    def capture(self, idx: torch.Tensor) -> None:
        """Record the step for a batch of ``len(idx)`` and run it for ``idx`` (one training step)."""
        self.idx = idx.clone()
        self.batch_size = int(idx.shape[0])
        train0, fwd0 = self.counter.train_samples, self.counter.forward_samples
        replay0 = self.counter.flops.n_replay_samples
        self.counter.new_step(self.batch_size)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss_sum += self.step(self.idx)
        # What the Python of one step counted; replays add the same amounts.
        self._train = self.counter.train_samples - train0
        self._fwd = self.counter.forward_samples - fwd0
        self._replay = self.counter.flops.n_replay_samples - replay0
        self._step_samples = self.counter.step_samples
        # Capture records without executing; the Python side effects above stand for this replay.
        self.graph.replay()

    def replay(self, idx: torch.Tensor) -> None:
        self.idx.copy_(idx)
        self.graph.replay()
        self.counter.add(self._train, self._fwd, self._replay)
        self.counter.step_samples = self._step_samples
        self.method.after_graph_replay(self.batch_size)
