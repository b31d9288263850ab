"""Optimisers for sparse continual learning.

- :mod:`.sam`: sharpness-aware minimisation (Foret et al. 2021) as a reusable two-pass step around
  any base optimiser (:class:`SAM`).
- :mod:`.frank_wolfe`: stochastic Frank-Wolfe over per-layer K-sparse polytopes
  (:class:`StochasticFrankWolfe`, :func:`ksparse_lmo`, :func:`expected_init_norm`), as used by EsaCL.
"""
from sparsecl.optim.frank_wolfe import (
    RESCALES, StochasticFrankWolfe, expected_init_norm, in_ksparse_polytope, ksparse_lmo, ksparse_radius,
)
from sparsecl.optim.sam import SAM

__all__ = [
    "RESCALES", "SAM", "StochasticFrankWolfe", "expected_init_norm", "in_ksparse_polytope", "ksparse_lmo",
    "ksparse_radius",
]
