"""Training on a masked network: the part every sparse-training method shares.

:class:`MaskOptions` are the option fields (sparsity, maskable layers, allocation) and
:class:`MaskedTraining` the mixin that owns a :class:`~sparsecl.sparse.MaskSet` on top of any
method: the masks are applied after every optimiser step through optimiser hooks (the wrapped
method's ``observe`` is unchanged), bound to the run's FLOP counter so every step is charged at the
real density, re-hooked onto each task's new optimiser and checkpointed. Used by ``snip-der++``,
``rigl-der++`` and SparCL (``sparcl-er``, ``sparcl-der++``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparsecl import SparseCLError
from sparsecl.data.stream import Task
from sparsecl.sparse.allocation import ALLOCATIONS, allocate, check_sparsity
from sparsecl.sparse.masks import MaskSet
from sparsecl.sparse.policy import PRESETS, MaskPolicy


INIT_SCALES = ("dense", "fan-in")


@dataclass
class MaskOptions:
    """Option fields of a masked network (mixed into a method's options dataclass)."""

    sparsity: float = 0.9  # fraction of masked-out weights over the maskable layers, in [0, 1)
    policy: str = "conv-linear"  # conv-linear (SPEC default) | residual-3x3 (SparCL's layers)
    include_first: bool = False  # also mask the first conv
    include_shortcuts: bool = False  # also mask 1x1 shortcut convs
    include_head: bool = False  # also mask the classifier
    allocation: str = "uniform"  # uniform (SparCL) | erk
    # dense: weights keep the dense initialisation; fan-in: the surviving weights of each masked
    # layer are scaled by 1/sqrt(density) when the mask is created, so a sparse layer's outputs
    # start with the variance of the dense layer's (Evci et al., "Gradient flow in sparse neural
    # networks", AAAI 2022, per layer rather than per neuron)
    init_scale: str = "dense"

    def validate_masks(self, allocations: tuple[str, ...] = ALLOCATIONS) -> None:
        """Raise :class:`SparseCLError` for an impossible sparsity or an unknown policy/allocation."""
        check_sparsity(self.sparsity)
        if self.policy not in PRESETS:
            raise SparseCLError(f"unknown mask policy {self.policy!r} (known: {', '.join(PRESETS)})")
        if self.allocation not in allocations:
            raise SparseCLError(f"unknown allocation {self.allocation!r} (known: {', '.join(allocations)})")
        if self.init_scale not in INIT_SCALES:
            raise SparseCLError(f"unknown init_scale {self.init_scale!r} (known: {', '.join(INIT_SCALES)})")

    def mask_policy(self) -> MaskPolicy:
        return MaskPolicy(self.policy, self.include_first, self.include_shortcuts, self.include_head)


class MaskedTraining:
    """Mixin (put it before the method class): a :class:`MaskSet` over the policy's layers.

    Subclasses create the masks (at construction or in :meth:`create_masks`) and adopt them with
    :meth:`install_masks`. Options must include the :class:`MaskOptions` fields.
    """

    masks: MaskSet | None
    supports_sparse_kernels = True

    def __init__(self, model, options, ctx) -> None:
        super().__init__(model, options, ctx)
        policy = options.mask_policy()
        self.mask_scope = policy.describe()
        self.mask_names: list[str] = policy.select(model)
        if not self.mask_names:
            raise SparseCLError(f"mask policy {self.mask_scope!r} selects no layer of this backbone "
                                "(e.g. residual-3x3 needs a ResNet; use -o policy=conv-linear)")
        self.masks = None

    def layer_counts(self, sparsity: float | None = None) -> dict[str, int]:
        """Active weights per maskable layer for ``sparsity`` (default: the option) and the allocation."""
        s = self.options.sparsity if sparsity is None else sparsity
        params = dict(self.model.named_parameters())
        shapes = {n: tuple(params[n].shape) for n in self.mask_names}
        return allocate(self.options.allocation, shapes, 1.0 - s)

    def create_masks(self, task: Task) -> MaskSet | None:
        """Build the masks before ``task`` (called while :attr:`masks` is None); None = not yet."""
        return None

    def install_masks(self, masks: MaskSet, fresh: bool = True) -> None:
        """Adopt ``masks``: zero the inactive weights, bind the FLOP counter, hook the optimiser.
        ``fresh``: masks just created (``init_scale`` applies), not restored from a checkpoint."""
        self.masks = masks
        masks.apply_()
        if fresh and self.options.init_scale == "fan-in":
            with torch.no_grad():
                for n in masks.names:
                    masks.params[n].mul_((masks.numel(n) / max(masks.active(n), 1)) ** 0.5)
        self.sync_masks()
        masks.bind_flops(self.ctx.flops)
        if self.optimizer is not None:
            masks.hook_optimizer(self.optimizer)

    def sync_masks(self) -> None:
        """Distributed: give every rank rank 0's masks (and re-mask the weights). Ranks compute
        them identically (same seed, same averaged gradients); the broadcast guarantees it."""
        d, masks = self.ctx.dist, self.masks
        if d is None or masks is None:
            return
        for n in masks.names:
            d.broadcast_(masks.masks[n])
            d.broadcast_(masks.ever_active[n])
            masks.set_mask(n, masks.masks[n], push=False)  # recount the active weights
        masks.apply_()
        masks.push_flops()

    def begin_task(self, task: Task) -> None:
        if self.masks is None:
            masks = self.create_masks(task)
            if masks is not None:
                self.install_masks(masks)
        super().begin_task(task)

    def make_optimizer(self, params: Any = None) -> torch.optim.Optimizer:
        optimizer = super().make_optimizer(params)
        if self.masks is not None:
            self.masks.unhook()  # the previous task's optimiser is gone
            self.masks.hook_optimizer(optimizer)
        return optimizer

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["masks"] = self.masks.state_dict() if self.masks is not None else None
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("masks") is not None:
            masks = MaskSet(self.model, state["masks"]["masks"])
            masks.load_state_dict(state["masks"])
            self.install_masks(masks, fresh=False)
