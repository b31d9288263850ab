"""A whole training step (batch gather, augmentation, forward, backward, optimizer step, replay
buffer insert) captured once in a CUDA graph and replayed for every later full batch of the task.

At batch 32 a ResNet-18 step is bound by kernel launches, not arithmetic; a replay launches the
whole step at once. Everything that varies per step lives in device tensors: the batch indices
are copied into a static index tensor, randomness comes from the graph-aware CUDA generator and
the replay buffer keeps its counters on the device. Python side effects that a replay cannot run
(sample and FLOP counting, the buffer's host-side count) are re-applied by :meth:`replay`.
:class:`TaskSteps` decides, step by step, whether a task's step runs eagerly, is captured or replayed.
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


class TaskSteps:
    """The training steps of one task: eager, or under ``--cuda-graph`` eager on a side stream (as
    capture requires) until the method's steady state, then one capture and replays of every later
    full batch. ``loss_sum`` accumulates the epoch's losses on the device (no host sync per step)."""

    WARMUP = 3  # eager steps before a capture (cuBLAS/cuDNN workspaces and lazy state exist then)

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], counter, method, batch_size: int,
                 device: torch.device, cuda_graph: bool) -> None:
        self.step, self.counter, self.method = step, counter, method
        self.batch_size, self.device = batch_size, device
        self.loss_sum = torch.zeros((), device=device)
        self.graph: CapturedStep | None = None
        self.side = torch.cuda.Stream(device) if cuda_graph else None
        self.eager_steps = 0

    def run(self, idx: torch.Tensor) -> None:
        """One training step on the examples ``idx``."""
        full = idx.shape[0] == self.batch_size
        if self.graph is not None and full:
            self.graph.replay(idx)
        elif self.side is not None and full and self.eager_steps >= self.WARMUP and self.method.graph_ready():
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self.graph = CapturedStep(self.step, self.loss_sum, self.counter, self.method)
            self.graph.capture(idx)
        else:
            self.counter.new_step(int(idx.shape[0]))
            if self.side is not None and self.graph is None:
                self.side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.side):
                    self.loss_sum += self.step(idx)
            else:
                self.loss_sum += self.step(idx)
            self.eager_steps += 1

    def sync(self) -> None:
        """At an epoch's end: the default stream waits for the side stream's eager steps."""
        if self.side is not None and self.graph is None:
            torch.cuda.current_stream(self.device).wait_stream(self.side)

    def close(self) -> None:
        """Drop the captured graph (and its memory pool)."""
        self.graph = None
