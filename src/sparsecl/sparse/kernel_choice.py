"""``--sparse-kernels auto``: run on the sparse kernels only where they beat the dense path, as
measured once (SPEC, "Real sparse execution on the CPU").

The unit of a choice is what can switch path on its own: a whole batch-last network (its layout
is all or nothing) or one layer of a per-layer network. A choice is measured for one situation:
the unit's shapes, the input shape, the pass (forward only, or forward and backward) and the
masked layers' densities (to 0.01). Measuring times both paths on a random input from a private
generator (no global random state is drawn), interleaved, and leaves the model as it was
(parameters untouched, gradients not accumulated, BatchNorm buffers restored).

Choices are kept in :attr:`KernelChoices.decisions` (JSON-safe; the trainer checkpoints them, so a
resumed run chooses as the first part did) and in a per-machine file beside the compiled kernels
(``$SPARSECL_CACHE/kernels/<build>-choices.json`` by default, keyed by thread count), so a rerun on the same
machine makes the same choices and gives the same results. Both paths agree to float rounding;
for results that must not depend on a timing, pin ``on`` or ``off``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsecl.sparse.kernels.build import build_hash, cache_root
from sparsecl.sparse.masks import MaskSet

ROUNDS = 3  # timed runs of each path, interleaved, after one warm-up each


def situation(unit: nn.Module, layers: list[nn.Module], x: torch.Tensor, masks: MaskSet, names: list[str]) -> str:
    """The key of one choice: the unit, a digest of its layers' weight shapes and densities, the
    input shape, the pass and the mode, and the masked layers' overall density (to read it)."""
    masked = [n for n in names if n in masks.masks]
    per_layer = [f"{'x'.join(map(str, m.weight.shape))}:{masks.density(n) if n in masks.masks else 1:.2f}"
                 for m, n in zip(layers, names)]
    digest = hashlib.sha1(",".join(per_layer).encode()).hexdigest()[:10]
    backward = torch.is_grad_enabled() and any(m.weight.requires_grad for m in layers)
    density = sum(masks.active(n) for n in masked) / max(1, sum(masks.numel(n) for n in masked))
    return (f"{type(unit).__name__}:{digest} in={'x'.join(map(str, x.shape))} {'fwd+bwd' if backward else 'fwd'} "
            f"{'train' if unit.training else 'eval'} density={density:.2f}")


def time_paths(dense: Callable[[torch.Tensor], torch.Tensor], sparse: Callable[[torch.Tensor], torch.Tensor],
               x: torch.Tensor, params: list[torch.Tensor], buffers: list[torch.Tensor], *,
               input_grad: bool) -> tuple[float, float]:
    """Median seconds of ``dense`` and ``sparse`` on a random input shaped like ``x`` (with the
    backward to ``params``, and to the input if ``input_grad``, when autograd is on); ``buffers``
    are restored afterwards."""
    saved = [b.detach().clone() for b in buffers]
    sample = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)
    backward = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    grads = [p for p in params if p.requires_grad]
    if backward and input_grad:
        grads.append(sample.requires_grad_())

    def once(fn: Callable) -> float:
        start = time.perf_counter()
        out = fn(sample)
        if backward:
            torch.autograd.grad(out.sum(), grads, allow_unused=True)
        return time.perf_counter() - start

    try:
        once(dense), once(sparse)
        times: dict[Callable, list[float]] = {dense: [], sparse: []}
        for _ in range(ROUNDS):
            for fn in (dense, sparse):
                times[fn].append(once(fn))
        return statistics.median(times[dense]), statistics.median(times[sparse])
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)


class KernelChoices:
    """The choices of one execution (see the module docstring)."""

    def __init__(self, decisions: dict[str, bool] | None = None, *, file: Path | None = None) -> None:
        self.decisions: dict[str, bool] = {} if decisions is None else decisions
        self.measured: dict[str, tuple[float, float]] = {}  # this process's timings: (dense, sparse) seconds
        self._file = file or cache_root() / f"{build_hash()}-choices.json"

    def choose(self, key: str, measure: Callable[[], tuple[float, float]]) -> bool:
        """Whether the kernels run in situation ``key``: remembered, else from this machine's file,
        else measured now (``measure`` returns the dense and sparse seconds) and remembered."""
        if key in self.decisions:
            return self.decisions[key]
        machine_key = f"threads={torch.get_num_threads()}|{key}"
        known = self._read()
        if machine_key not in known:
            dense, sparse = self.measured[key] = measure()
            known = self._update(machine_key, sparse < dense)
        self.decisions[key] = bool(known[machine_key])
        return self.decisions[key]

    def _read(self) -> dict[str, bool]:
        try:
            data = json.loads(self._file.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measure again
            return {}
        return data if isinstance(data, dict) else {}

    def _update(self, key: str, value: bool) -> dict[str, bool]:
        """Add one choice to the machine's file (locked; written whole, then renamed)."""
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            with open(self._file.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                known = {**self._read(), key: value}
                fd, tmp = tempfile.mkstemp(dir=self._file.parent, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(known, f, indent=1, sort_keys=True)
                os.replace(tmp, self._file)
                return known
        except OSError:  # an unwritable cache only costs a measurement in the next run
            return {**self._read(), key: value}
