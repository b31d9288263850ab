"""Shared base of the sparse-training DER++ baselines (``snip-der++``, ``rigl-der++``; SparCL Table 2).

DER++ (:class:`~sparsecl.methods.derpp.DERpp`) trained with a :class:`~sparsecl.sparse.MaskSet`
over the layers chosen by a :class:`~sparsecl.sparse.MaskPolicy`: the masks are applied after
every optimiser step through optimiser hooks (DER++'s ``observe`` is unchanged), and bound to
the run's FLOP counter so that every step is charged at the real density. Not registered itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.methods.derpp import DERpp, DERppOptions
from sparsecl.sparse.allocation import ALLOCATIONS, allocate, check_sparsity
from sparsecl.sparse.masks import MaskSet
from sparsecl.sparse.policy import PRESETS, MaskPolicy


@dataclass
class SparseDERppOptions(DERppOptions):
    """DER++ options plus the sparsity, the maskable layers and the per-layer allocation."""

    sparsity: float = 0.9  # fraction of masked-out weights over the maskable layers, in [0, 1)
    policy: str = "conv-linear"  # conv-linear (SPEC default) | residual-3x3 (SparCL's layers)
    include_first: bool = False  # also mask the first conv
    include_shortcuts: bool = False  # also mask 1x1 shortcut convs
    include_head: bool = False  # also mask the classifier
    allocation: str = "uniform"  # uniform (SparCL Table 2) | erk

    allocations: ClassVar[tuple[str, ...]] = ALLOCATIONS

    def validate(self) -> None:
        super().validate()
        check_sparsity(self.sparsity)
        if self.policy not in PRESETS:
            raise SparseCLError(f"unknown mask policy {self.policy!r} (known: {', '.join(PRESETS)})")
        if self.allocation not in self.allocations:
            raise SparseCLError(f"unknown allocation {self.allocation!r} (known: {', '.join(self.allocations)})")

    def mask_policy(self) -> MaskPolicy:
        return MaskPolicy(self.policy, self.include_first, self.include_shortcuts, self.include_head)


class SparseDERpp(DERpp):
    """DER++ on a masked network. Subclasses create :attr:`masks` in :meth:`create_masks`."""

    options_cls = SparseDERppOptions
    graph_capturable = False

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        policy = options.mask_policy()
        self.mask_policy = policy.describe()
        self.mask_names = policy.select(model)
        self.masks: MaskSet | None = None

    # ------------------------------------------------------------------ masks
    def layer_counts(self) -> dict[str, int]:
        """Active weights per maskable layer for the configured sparsity and allocation."""
        params = dict(self.model.named_parameters())
        shapes = {n: tuple(params[n].shape) for n in self.mask_names}
        return allocate(self.opt.allocation, shapes, 1.0 - self.opt.sparsity)

    def create_masks(self, task: Task) -> MaskSet | None:
        """Build the masks before ``task`` (called while :attr:`masks` is None); None = not yet."""
        raise NotImplementedError

    def install_masks(self, masks: MaskSet) -> None:
        """Adopt ``masks``: zero the inactive weights, bind the FLOP counter, hook the optimiser."""
        self.masks = masks
        masks.apply_()
        if self.ctx.flops is not None:
            masks.bind_flops(self.ctx.flops)
        if self.optimizer is not None:
            masks.hook_optimizer(self.optimizer)

    def begin_task(self, task: Task) -> None:
        if self.masks is None:
            masks = self.create_masks(task)
            if masks is not None:
                self.install_masks(masks)
        elif self.ctx.flops is not None:
            self.masks.bind_flops(self.ctx.flops)  # e.g. after a resume: densities of the loaded masks
        super().begin_task(task)

    def make_optimizer(self, params: Any = None) -> torch.optim.Optimizer:
        optimizer = super().make_optimizer(params)
        if self.masks is not None:
            self.masks.unhook()  # the previous task's optimiser is gone
            self.masks.hook_optimizer(optimizer)
        return optimizer

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["masks"] = self.masks.state_dict() if self.masks is not None else None
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("masks") is not None:
            masks = MaskSet(self.model, state["masks"]["masks"])
            masks.load_state_dict(state["masks"])
            self.install_masks(masks)
