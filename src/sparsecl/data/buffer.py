"""Reservoir replay buffer kept on the training device.

Stores *non-augmented* uint8 inputs (augmentation is applied when samples are drawn, as in
Mammoth), labels, the task index of each sample and optional extra per-sample tensors such as
DER++'s logits. Insertion is vectorised: a whole batch is placed with one scatter, following the
exact semantics of sequential reservoir sampling (Vitter's algorithm R) without a Python loop over
samples and without host synchronisation.
"""
from __future__ import annotations

import torch


class ReservoirBuffer:
    """Fixed-capacity reservoir sample of everything passed to :meth:`add`.

    Every example seen so far is in the buffer with the same probability ``capacity / seen``.
    One extra "trash" row at index ``capacity`` absorbs the writes of samples that are not kept,
    so a batch insert is a single ``index_copy`` with no data-dependent shapes.
    """

    def __init__(self, capacity: int, device: torch.device | str) -> None:
        if capacity < 0:
            raise ValueError("buffer capacity must be >= 0")
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.seen = 0  # host-side count of examples offered so far (sizes, checkpoints)
        # The same count on the device: reservoir draws read it there, so an insert has no
        # host-dependent constants and can be replayed inside a captured CUDA graph.
        self._seen_dev = torch.zeros((), dtype=torch.long, device=self.device)
        self._store: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    @property
    def is_empty(self) -> bool:
        return len(self) == 0

    def fields(self) -> list[str]:
        return list(self._store)

    def _allocate(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self._store[name] = torch.zeros((self.capacity + 1, *t.shape[1:]), dtype=t.dtype, device=self.device)

    # ---------------------------------------------------------------- writing
    def slots_for(self, n: int) -> torch.Tensor:
        """Destination row of each of the next ``n`` examples (``capacity`` = not kept).

        Example ``k`` (0-based over the whole stream) goes to row ``k`` while the buffer fills,
        afterwards to a uniform row in ``[0, k]`` that is kept only if it is ``< capacity``. When two
        examples of the same batch pick the same row, the later one wins, as in a sequential loop.
        """
        k = self._seen_dev + torch.arange(n, device=self.device)
        draw = torch.floor(torch.rand(n, device=self.device, dtype=torch.float64) * (k + 1)).long()
        slot = torch.where(k < self.capacity, k, draw)
        slot = torch.where(slot < self.capacity, slot, torch.full_like(slot, self.capacity))
        # Resolve collisions inside the batch: the last writer of each row wins.
        order = torch.arange(n, device=self.device)
        last = torch.full((self.capacity + 1,), -1, dtype=torch.long, device=self.device)
        last.scatter_reduce_(0, slot, order, reduce="amax")
        winner = last[slot] == order
        return torch.where(winner, slot, torch.full_like(slot, self.capacity))

    def add(self, **tensors: torch.Tensor) -> None:
        """Offer a batch of examples; all tensors share the leading batch dimension.

        The first call fixes the stored fields (e.g. ``x``, ``y``, ``task``, ``logits``).
        """
        if self.capacity == 0:
            n = int(next(iter(tensors.values())).shape[0])
            self._seen_dev += n
            self.seen += n
            return
        if not self._store:
            self._allocate(tensors)
        if set(tensors) != set(self._store):
            raise ValueError(f"buffer fields are {sorted(self._store)}, got {sorted(tensors)}")
        n = int(next(iter(tensors.values())).shape[0])
        slot = self.slots_for(n)
        for name, t in tensors.items():
            self._store[name].index_copy_(0, slot, t.detach().to(self._store[name].dtype))
        self._seen_dev += n
        self.seen += n

    def advance_host(self, n: int) -> None:
        """Count ``n`` examples on the host only, after a replayed CUDA graph ran :meth:`add`
        (the replay moved the device count and the stored rows, but runs no Python)."""
        self.seen += n

    def update(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite field ``name`` of stored rows ``index`` (e.g. refreshed logits)."""
        self._store[name].index_copy_(0, index, values.detach().to(self._store[name].dtype))

    # ---------------------------------------------------------------- reading
    def sample_indices(self, n: int) -> torch.Tensor:
        """Up to ``n`` distinct stored rows, uniformly at random (without replacement)."""
        size = len(self)
        # argsort of uniform keys = a uniform random permutation, and capturable in a CUDA graph.
        return torch.rand(size, device=self.device).argsort()[: min(n, size)]

    def get(self, index: torch.Tensor, *names: str) -> tuple[torch.Tensor, ...]:
        return tuple(self._store[name][index] for name in names)

    def sample(self, n: int, *names: str) -> tuple[torch.Tensor, ...]:
        """``n`` random distinct stored examples: returns (index, field1, field2, ...)."""
        idx = self.sample_indices(n)
        return (idx, *self.get(idx, *names))

    def all(self, *names: str) -> tuple[torch.Tensor, ...]:
        """Every stored example's fields, in row order."""
        return tuple(self._store[name][: len(self)] for name in names)

    def nbytes(self) -> int:
        """Bytes held by the stored examples (the trash row excluded)."""
        return sum(t[: self.capacity].numel() * t.element_size() for t in self._store.values())

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "store": {k: v.cpu() for k, v in self._store.items()}}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError("checkpoint buffer capacity differs from the configured one")
        self.seen = int(state["seen"])
        self._seen_dev.fill_(self.seen)
        self._store = {k: v.to(self.device) for k, v in state["store"].items()}
