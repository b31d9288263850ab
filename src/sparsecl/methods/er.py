"""Experience Replay (``er``): rehearsal of a reservoir buffer mixed into every batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecl import SparseCLError
from sparsecl.data.buffer import ReservoirBuffer
from sparsecl.methods.base import Batch, ContinualMethod, MethodOptions, StepLoss, StepOutputs, register_method


@dataclass
class ReplayOptions(MethodOptions):
    """Options shared by every method with a reservoir replay buffer."""

    buffer_size: int = 500
    minibatch_size: int | None = None  # buffer samples drawn per step; None = the batch size

    def validate(self) -> None:
        super().validate()
        if self.buffer_size < 0:
            raise SparseCLError(f"buffer size must be >= 0, got {self.buffer_size}")
        if self.minibatch_size is not None and self.minibatch_size <= 0:
            raise SparseCLError(f"minibatch_size must be > 0, got {self.minibatch_size}")


class ReplayMethod(ContinualMethod, graph_capturable=True):
    """Base for rehearsal methods: owns the buffer and its checkpointing."""

    options_cls = ReplayOptions

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        self.buffer = ReservoirBuffer(options.buffer_size, ctx.device)
        self.minibatch = options.minibatch_size or ctx.batch_size

    def memory_bytes(self) -> int:
        return self.buffer.nbytes()

    def draw_sizes(self) -> list[int]:
        n = min(self.minibatch, len(self.buffer))
        return [n] if n else []

    def draw(self, *fields: str) -> tuple[torch.Tensor, ...]:
        """A buffer minibatch: augmented inputs first, then the requested extra fields.

        Distributed: every rank draws and augments the same global minibatch (same RNG stream as
        one process) and keeps its slice."""
        _, x_raw, *rest = self.buffer.sample(self.minibatch, "x", *fields)
        self.ctx.note_replay(int(x_raw.shape[0]))
        out = (self.ctx.augment.train(x_raw), *rest)
        d = self.ctx.dist
        return out if d is None else tuple(d.shard(t) for t in out)

    def remember(self, batch: Batch, **extra: torch.Tensor) -> None:
        """Offer the batch's non-augmented examples to the reservoir.

        Distributed, sharded step: every rank inserts the whole global batch (extra fields such as
        logits gathered from all ranks) with the same RNG, so the buffers stay identical."""
        x_raw, y = batch.x_raw, batch.y
        if batch.full_y is not None:
            x_raw, y = batch.full_x_raw, batch.full_y
            extra = {k: self.ctx.dist.gather(v) for k, v in extra.items()}
        self.buffer.add(x=x_raw, y=y, task=torch.full_like(y, batch.task_id), **extra)

    def after_step(self, batch: Batch, step: StepLoss) -> None:
        self.remember(batch, **step.stored)

    def graph_ready(self) -> bool:
        # Before the buffer is full, the number of replayable samples still changes per step.
        return len(self.buffer) == self.buffer.capacity

    def after_graph_replay(self, batch_size: int) -> None:
        self.buffer.advance_host(batch_size)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])


@register_method
class ER(ReplayMethod, distributed=True):
    """Each step trains on the current batch concatenated with a buffer minibatch (Mammoth's ER)."""

    name = "er"
    description = "experience replay: current batch + reservoir-buffer minibatch, one forward"

    def step_loss(self, batch: Batch) -> StepLoss:
        x, y = batch.x, batch.y
        tasks: torch.Tensor | int = batch.task_id
        if not self.buffer.is_empty:
            bx, by, bt = self.draw("y", "task")
            x, y = torch.cat([x, bx]), torch.cat([y, by])
            tasks = torch.cat([torch.full_like(batch.y, batch.task_id), bt])
        out = self.net(x)
        n, rows = batch.y.shape[0], x.shape[0]
        outputs = StepOutputs(batch, out[:n], rows)
        if rows > n:
            outputs.buffer, outputs.buffer_y, outputs.buffer_task, outputs.buffer_rows = out[n:], y[n:], tasks[n:], rows
        return StepLoss(self.loss(out, y, tasks), outputs)
