"""Shared base of the sparse-training DER++ baselines (``snip-der++``, ``rigl-der++``; SparCL Table 2).

DER++ (:class:`~sparsecl.methods.derpp.DERpp`) trained with a :class:`~sparsecl.sparse.MaskSet`
over the layers chosen by a :class:`~sparsecl.sparse.MaskPolicy` (:mod:`sparsecl.methods.masked`):
the masks are applied after every optimiser step through optimiser hooks (DER++'s ``observe`` is
unchanged), and bound to the run's FLOP counter so that every step is charged at the real density.
Not registered itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sparsecl.methods.derpp import DERpp, DERppOptions
from sparsecl.methods.masked import MaskedTraining, MaskOptions
from sparsecl.sparse.allocation import ALLOCATIONS


@dataclass
class SparseDERppOptions(DERppOptions, MaskOptions):
    """DER++ options plus the sparsity, the maskable layers and the per-layer allocation."""

    allocations: ClassVar[tuple[str, ...]] = ALLOCATIONS

    def validate(self) -> None:
        super().validate()
        self.validate_masks(self.allocations)


class SparseDERpp(MaskedTraining, DERpp, graph_capturable=False):
    """DER++ on a masked network. Subclasses create :attr:`masks` (see :class:`MaskedTraining`)."""

    options_cls = SparseDERppOptions
