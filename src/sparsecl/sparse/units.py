"""Units (neurons) of a plain chain of linear layers and the weight masks they define (NISPA,
DEN and CPG reason about units: stable/plastic, timestamped, grown).

A :class:`UnitChain` is built on a :class:`~sparsecl.models.ContinualNet` whose backbone is a chain
``Flatten -> Linear -> ReLU -> ... -> Linear -> ReLU`` (the MLP backbone) and whose head is one
linear classifier or a :class:`~sparsecl.models.MultiHead`. Layer ``i`` maps the units of level
``i`` to those of level ``i + 1``: level 0 are the inputs, the hidden levels the backbone's
layers' outputs, and each head maps the last hidden level to its classes. A weight ``W[o, i]``
connects input unit ``i`` to output unit ``o``, so a unit's *incoming* connections are a row.

Per hidden unit the chain keeps a *stamp* (int16): the task that opened it, or ``-1`` while it is
closed (reserved capacity of the allocated tensors, not part of the network yet). Weight masks
come from stamps: :meth:`UnitChain.structure` is ``open(out) x open(in)`` per layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsecl import SparseCLError

if TYPE_CHECKING:
    from sparsecl.sparse.masks import MaskSet

CLOSED = -1


class UnitChain:
    """The linear layers of an MLP backbone (plus its heads) and the state of their hidden units.

    Args:
        model: a ContinualNet with an MLP-style backbone (Flatten, Linear and ReLU modules only).
        base: hidden units per layer open from the start (stamp 0); ``None`` = all of them.
        who: the method's name, for the error message.
    """

    def __init__(self, model: nn.Module, base: int | None = None, who: str = "this method") -> None:
        mods = list(model.backbone.modules())[1:]
        if not all(isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU, nn.Sequential)) for m in mods):
            raise SparseCLError(f"{who} needs the mlp backbone (a plain chain of linear layers; "
                                f"got {type(model.backbone).__name__})")
        layers = [(n, m) for n, m in model.backbone.named_modules() if isinstance(m, nn.Linear)]
        self.names = [f"backbone.{n}.weight" for n, _ in layers]
        self.bias_names = [f"backbone.{n}.bias" for n, _ in layers]
        self.relus = [m for m in mods if isinstance(m, nn.ReLU)]  # the output of hidden level i+1
        self.n_inputs = layers[0][1].in_features
        self.width = [m.out_features for _, m in layers]
        device = layers[0][1].weight.device
        heads = getattr(model.head, "heads", None)
        self.head_names = ([f"head.heads.{t}.weight" for t in range(len(heads))] if heads is not None
                           else ["head.weight"])
        params = dict(model.named_parameters())
        self.head_rows = {n: params[n].shape[0] for n in self.head_names}
        self.multi_head = heads is not None
        self.stamp = []
        for w in self.width:
            open_n = w if base is None else int(base)
            if not 0 < open_n <= w:
                raise SparseCLError(f"{who}: base width {open_n} outside [1, {w}] (the allocated width)")
            s = torch.full((w,), CLOSED, dtype=torch.int16, device=device)
            s[:open_n] = 0
            self.stamp.append(s)

    # ------------------------------------------------------------------ units
    def open(self, level: int, upto: int | None = None) -> torch.Tensor:
        """Bool mask of the units of hidden ``level`` (0-based) that are open (by task ``upto``)."""
        s = self.stamp[level]
        return (s != CLOSED) if upto is None else ((s != CLOSED) & (s <= upto))

    def open_(self, level: int, units: torch.Tensor, task: int) -> None:
        """Open the given closed units (bool mask or indices) of hidden ``level`` for ``task``."""
        s = self.stamp[level]
        idx = torch.zeros_like(s, dtype=torch.bool)
        idx[units] = True
        if bool((idx & (s != CLOSED)).any()):
            raise SparseCLError("cannot open a unit that is already open")
        s.masked_fill_(idx, int(task))

    def close_(self, level: int, units: torch.Tensor) -> None:
        """Close units again (e.g. DEN's useless new units)."""
        self.stamp[level][units] = CLOSED

    def closed_units(self, level: int, k: int) -> torch.Tensor:
        """Indices of the first ``k`` closed units of ``level`` (fewer if fewer are left)."""
        return torch.nonzero(self.stamp[level] == CLOSED).flatten()[:k]

    def sources(self, layer: int, upto: int | None = None) -> torch.Tensor:
        """Input-unit mask of backbone layer ``layer`` (inputs are always open)."""
        if layer == 0:
            return torch.ones(self.n_inputs, dtype=torch.bool, device=self.stamp[0].device)
        return self.open(layer - 1, upto)

    # ------------------------------------------------------------------ masks
    def structure(self, upto: int | None = None) -> dict[str, torch.Tensor]:
        """Per weight (backbone layers and heads): open outputs x open inputs (by task ``upto``)."""
        out = {n: self.open(i, upto)[:, None] & self.sources(i, upto)[None, :] for i, n in enumerate(self.names)}
        last = self.open(len(self.width) - 1, upto)[None, :]
        for n in self.head_names:
            out[n] = last.expand(self.head_rows[n], -1).clone()
        return out

    @torch.no_grad()
    def grow_(self, units: list[torch.Tensor], task: int, masks: "MaskSet", init: dict[str, torch.Tensor]) -> None:
        """Open ``units[level]`` (indices of closed units) for ``task``: their incoming and outgoing
        weights take the values of ``init`` (the allocated tensors' initial weights) and join
        ``masks``; heads of tasks before ``task`` never see new units (their columns stay zero)."""
        before = self.structure()
        for level, u in enumerate(units):
            self.open_(level, u, task)
        for n, m in self.structure().items():
            new = m & ~before[n]
            if n in self.head_names and self.multi_head and self.head_names.index(n) < task:
                new = torch.zeros_like(new)
            p = masks.params[n]
            p.copy_(torch.where(new, init[n], p))
            masks.set_mask(n, masks.masks[n] | new)

    @torch.no_grad()
    def shut_(self, level: int, units: torch.Tensor, masks: "MaskSet") -> None:
        """Close ``units`` of ``level`` again: their weights leave ``masks`` and become zero."""
        self.close_(level, units)
        for n, m in self.structure().items():
            masks.set_mask(n, masks.masks[n] & m)
        masks.apply_()

    def backbone_weights(self, widths: list[int] | None = None) -> int:
        """Weights of the backbone at ``widths`` (default: the open units)."""
        widths = widths or [int(self.open(i).sum()) for i in range(len(self.width))]
        dims = [self.n_inputs, *widths]
        return sum(a * b for a, b in zip(dims[:-1], dims[1:]))

    def base_weights(self, base: int) -> int:
        """Weights of the backbone with ``base`` units per hidden layer (the "one network" of model size)."""
        return self.backbone_weights([base] * len(self.width))

    # ------------------------------------------------------------------ activations
    @torch.no_grad()
    def mean_activations(self, model: nn.Module, x: torch.Tensor, batch: int = 512) -> list[torch.Tensor]:
        """Mean post-ReLU activation of every hidden unit over the inputs ``x`` (one forward pass
        of the model per ``batch`` examples, in the model's current mode)."""
        sums = [torch.zeros(w, device=x.device) for w in self.width]
        def watch(i: int):
            def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
                sums[i].add_(out.sum(0))  # returns None: the output is not replaced
            return hook

        hooks = [r.register_forward_hook(watch(i)) for i, r in enumerate(self.relus)]
        try:
            for start in range(0, len(x), batch):
                model(x[start:start + batch])
        finally:
            for h in hooks:
                h.remove()
        return [s / max(len(x), 1) for s in sums]

