"""Per-layer density allocation: uniform and ERK, turned into exact active-weight counts (SPEC).

- uniform: every layer gets the same density ``d``; each layer's count is ``round(d * n_l)``.
- ERK (Erdos-Renyi-Kernel, Evci et al. 2020): ``raw_l = sum(shape_l) / prod(shape_l)``; find
  ``eps`` so that ``sum_l min(1, eps * raw_l) * n_l = d * N``. Layers with ``eps * raw_l > 1`` are
  made dense and ``eps`` is solved again on the rest, until none saturates (``eps`` only grows
  when layers are moved, so a layer once saturated stays saturated). The counts then use
  largest-remainder rounding so that they sum to exactly ``round(d * N)`` and never exceed ``n_l``.

Counts are what masks are built from (top-k), so a layer's density is exactly ``count / n_l``.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from sparsecl import SparseCLError

ALLOCATIONS = ("uniform", "erk")


def check_density(density: float, what: str = "density") -> float:
    """``density`` as a float in ``(0, 1]``; anything else is a one-line :class:`SparseCLError`."""
    d = float(density)
    if not (0.0 < d <= 1.0) or math.isnan(d):
        raise SparseCLError(f"{what} must lie in (0, 1], got {density!r}")
    return d


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in ``[0, 1)`` (``1 - density``); else a one-line :class:`SparseCLError`."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise SparseCLError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0):
        raise SparseCLError(f"sparsity must lie in [0, 1) (fraction of masked-out weights), got {sparsity!r}")
    return s


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """The same density for every layer."""
    d = check_density(density)
    return {name: d for name in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """ERK densities (continuous, before rounding to counts): ``min(1, eps * raw_l)``.

    ``sum_l density_l * n_l == density * N`` up to floating point, and no density exceeds 1.
    """
    d = check_density(density)
    sizes = {name: math.prod(int(s) for s in shape) for name, shape in shapes.items()}
    raw = {name: sum(int(s) for s in shape) / sizes[name] for name, shape in shapes.items()}
    target = d * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:  # only reachable for d == 1
            return {name: 1.0 for name in shapes}
        budget = target - sum(sizes[n] for n in dense)
        eps = budget / sum(raw[n] * sizes[n] for n in free)
        saturated = {n for n in free if eps * raw[n] > 1.0}
        if not saturated:
            break
        dense |= saturated
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


def density_counts(densities: Mapping[str, float], sizes: Mapping[str, int], *, exact_total: bool = False) -> dict[str, int]:
    """Active-weight count per layer for the given densities.

    With ``exact_total=False`` each layer gets ``round(density_l * n_l)`` (half up). With
    ``exact_total=True`` the counts sum to ``round(sum_l density_l * n_l)`` exactly by largest
    remainder (ties broken by layer order); a count never exceeds ``n_l``.
    """
    exact = {n: float(densities[n]) * int(sizes[n]) for n in densities}
    if not exact_total:
        return {n: min(int(sizes[n]), int(math.floor(v + 0.5))) for n, v in exact.items()}
    counts = {n: min(int(sizes[n]), int(math.floor(v + 1e-9))) for n, v in exact.items()}
    total = int(math.floor(sum(exact.values()) + 0.5))
    missing = total - sum(counts.values())
    order = sorted((n for n in exact if counts[n] < int(sizes[n])), key=lambda n: -(exact[n] - counts[n]))
    for n in order[:max(missing, 0)]:
        counts[n] += 1
    return counts


def allocate(kind: str, shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, int]:
    """Exact active-weight counts per layer for allocation ``kind`` (``'uniform'`` or ``'erk'``)."""
    sizes = {n: math.prod(int(s) for s in shape) for n, shape in shapes.items()}
    if kind == "uniform":
        return density_counts(uniform_densities(shapes, density), sizes)
    if kind == "erk":
        return density_counts(erk_densities(shapes, density), sizes, exact_total=True)
    raise SparseCLError(f"unknown density allocation {kind!r} (known: {', '.join(ALLOCATIONS)})")
