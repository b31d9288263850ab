"""Sparse core: masks, maskable-layer policies, density allocation, drop/grow, per-task ownership,
FLOP accounting and export.

Modules:

- :mod:`.flops`: per-layer training FLOPs at the current weight/gradient densities (:class:`FlopCounter`).
- :mod:`.policy`: which weights are maskable (:class:`MaskPolicy`, presets ``conv-linear`` and ``residual-3x3``).
- :mod:`.allocation`: uniform and ERK densities, exact per-layer counts (:func:`allocate`).
- :mod:`.masks`: :class:`MaskSet` (bool masks applied after each optimiser step, gradient masks,
  ever-active mask, densities, mask bytes, checkpoints), :func:`topk_mask`, :func:`random_mask`.
- :mod:`.growth`: drop by magnitude or any score; grow random / unfired / gradient / momentum
  (:func:`drop_and_grow_`), RigL's cosine update fraction.
- :mod:`.ownership`: per-task ownership (:class:`TaskOwnership`), :class:`FrozenGuard` (frozen weights
  bit-identical through any optimiser).
- :mod:`.accounting`: densities into the FLOP counter, the sparsity and capacity reports.
- :mod:`.export`: the final sparse model with its masks (bitmask or CSR) and :func:`~.export.load_export`.
- :mod:`.kernels`: real sparse execution on the CPU (C++ kernels built on first use; imported on
  demand, not from here): :class:`~.kernels.SparseConvIndex`, :func:`~.kernels.sparse_conv2d`,
  :func:`~.kernels.sparse_linear`.
"""
from sparsecl.sparse.allocation import ALLOCATIONS, allocate, check_sparsity, density_counts, erk_densities, uniform_densities
from sparsecl.sparse.flops import FlopCounter, LayerProfile, profile_layers
from sparsecl.sparse.growth import (
    GROWTH_MODES, cosine_update_fraction, drop_and_grow_, drop_lowest, grow, optimizer_momentum,
    reset_optimizer_state_,
)
from sparsecl.sparse.masks import MaskSet, bitmask_bytes, random_mask, topk_mask
from sparsecl.sparse.ownership import FrozenGuard, TaskOwnership
from sparsecl.sparse.policy import MaskPolicy

__all__ = [
    "ALLOCATIONS", "GROWTH_MODES", "FlopCounter", "FrozenGuard", "LayerProfile", "MaskPolicy", "MaskSet",
    "TaskOwnership", "allocate", "bitmask_bytes", "check_sparsity", "cosine_update_fraction", "density_counts",
    "drop_and_grow_", "drop_lowest", "erk_densities", "grow", "optimizer_momentum", "profile_layers",
    "random_mask", "reset_optimizer_state_", "topk_mask", "uniform_densities",
]
