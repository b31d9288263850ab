"""Multi-process training under ``torchrun`` (``torch.distributed``, DistributedDataParallel).

Design (details in ``docs/distributed.md``): every rank runs the same seeded program, so model
initialisation, class order, batch order, augmentation draws, buffer draws and reservoir
insertions are identical everywhere. The configured batch size is the *global* batch: it is drawn
on every rank and each rank trains on its contiguous slice (``batch / world`` examples). A step is
sharded only when the current batch and every buffer draw of the step divide evenly by the world
size; otherwise (a short last batch, a buffer smaller than the minibatch) every rank computes the
whole step. Either way DDP's gradient average equals the single-process gradient of the global
mean loss.

Nothing here runs at import, and a single process never creates a :class:`Distributed`.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sparsecl import SparseCLError
from sparsecl.engine.launch import is_main_process, launched_world_size, process_rank

T = TypeVar("T")


class Distributed:
    """This rank's view of the process group, plus the sharding state of the current step.

    Create it with :meth:`from_env` (which initialises the process group), end it with
    :meth:`close`. Methods reach it as ``ctx.dist`` and use :meth:`shard` / :meth:`gather` on
    tensors of the global step; both are identities when :attr:`sharded` is False.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, *,
                 owns_group: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.sharded = False  # set by the engine before every training step
        self.owns_group = owns_group  # created the process group here, so destroys it in close()

    # ------------------------------------------------------------------ set-up
    @classmethod
    def from_env(cls) -> "Distributed | None":
        """Join the ``torchrun`` process group, or return None in a single process.

        With CUDA the group has both backends (Gloo for CPU tensors, NCCL for CUDA ones), so the
        training device can be chosen after joining (see :meth:`select_device`).
        """
        world = launched_world_size()
        if world <= 1:
            return None
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
        if cuda:
            torch.cuda.set_device(local_rank)  # NCCL binds this rank's communicator to the current device
        owns = not dist.is_initialized()  # a caller's own process group is used, not replaced
        if owns:
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
        return cls(rank, world, local_rank, torch.device("cpu"), owns_group=owns)

    def select_device(self, name: str) -> torch.device:
        """The training device for ``--device name``: ``auto``/``cuda`` give ``cuda:LOCAL_RANK``
        when CUDA is available, ``cpu`` (or ``auto`` without CUDA) the CPU."""
        if name not in ("auto", "cpu", "cuda"):
            raise SparseCLError(f"--device {name} is not usable under torchrun: pass cpu, cuda or auto "
                                "(each rank then takes cuda:LOCAL_RANK)")
        if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
            self.device = torch.device("cpu")
            return self.device
        if not torch.cuda.is_available():
            raise SparseCLError("--device cuda requested but CUDA is not available on this machine")
        if self.local_rank >= torch.cuda.device_count():
            raise SparseCLError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                                "lower --nproc_per_node")
        self.device = torch.device("cuda", self.local_rank)
        return self.device

    @property
    def backend(self) -> str:
        """The collective backend of the training device (``nccl`` or ``gloo``)."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    def close(self) -> None:
        """Leave the process group (after the last collective) if :meth:`from_env` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DistributedDataParallel (the module the training forwards use).

        The parameters stay those of ``model``: state dicts, masks and optimisers keep using it.
        """
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # ------------------------------------------------------------------ sharding
    def divides(self, n: int) -> bool:
        """Whether ``n`` examples split into equal non-empty slices, one per rank."""
        return n > 0 and n % self.world_size == 0

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global-step tensor (the whole tensor if not sharded)."""
        if not self.sharded:
            return t
        n = t.shape[0] // self.world_size
        return t[self.rank * n : (self.rank + 1) * n]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's slice in rank order: the global-step tensor again."""
        if not self.sharded:
            return t
        t = t.contiguous()
        out = t.new_empty((t.shape[0] * self.world_size, *t.shape[1:]))
        dist.all_gather_into_tensor(out, t)
        return out

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place; returns it."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` with rank 0's values (bool tensors too)."""
        dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=0)

    def broadcast_buffers_(self, model: nn.Module) -> None:
        """Give every rank rank 0's module buffers (e.g. BatchNorm running statistics)."""
        for b in model.buffers():
            self.broadcast_(b.data)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` (picklable) on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result (or its :class:`SparseCLError`) to every
        rank, so that file-system checks agree everywhere even without a shared file system."""
        result: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                result = (True, fn())
            except SparseCLError as e:
                result = (False, str(e))
        ok, value = self.broadcast_object(result)
        if not ok:
            raise SparseCLError(value)
        return value

    def everywhere(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it fails on any rank, every rank raises that rank's error
        (so a missing data file on one node is one clear message, not a hang)."""
        try:
            value, error = fn(), None
        except SparseCLError as e:
            value, error = None, str(e)
        errors: list[str | None] = [None] * self.world_size
        dist.all_gather_object(errors, error)
        for rank, e in enumerate(errors):
            if e is not None:
                raise SparseCLError(e if rank == 0 else f"rank {rank}: {e}")
        return value  # type: ignore[return-value]


__all__ = ["Distributed", "is_main_process", "launched_world_size", "process_rank"]
