"""Stochastic Frank-Wolfe over per-layer K-sparse polytopes (EsaCL eq. 3.11-3.13; SPEC "EsaCL").

The K-sparse polytope ``C(K, r)`` of ``R^n`` is the convex hull of the vectors with exactly ``K``
non-zero entries, each ``+r`` or ``-r``; equivalently the intersection of the L1 ball of radius
``K * r`` and the L-infinity ball of radius ``r`` (Pokutta et al. 2020, "Deep neural network
training with Frank-Wolfe"). Its linear minimisation oracle is closed-form::

    LMO(m) = argmin_{v in C(K, r)} <m, v> = -r * sign(m) on the K largest |m|, 0 elsewhere

and a Frank-Wolfe step ``theta <- theta + eta * (v - theta)`` with ``eta in [0, 1]`` is a convex
combination of two points of the polytope, so the iterates never leave it (no projection).

:class:`StochasticFrankWolfe` is a ``torch.optim.Optimizer``. Parameter groups with ``k`` and
``radius`` set are constrained: each parameter of such a group is its own polytope ``C(k, radius)``
(EsaCL builds one group per layer, ``K = ceil(k_frac * n_l)``). Per step and constrained parameter:

1. momentum ``m <- mu * m + (1 - mu) * g`` (``mu`` 0.9; the first step starts from ``m = g``);
2. ``v = LMO(m)``;
3. ``eta = clamp(lr * ||m|| / ||theta - v||, 0, 1)`` (``rescale='gradient'``, the default, as in
   Pokutta et al.) or ``eta = lr`` (``rescale='none'``);
4. ``theta <- theta + eta * (v - theta)``.

No weight decay. Parameters of unconstrained groups (BatchNorm, biases, a dense head) take a plain
SGD step ``theta <- theta - lr * g``. Frozen entries (:meth:`StochasticFrankWolfe.set_frozen`, a bool
mask per parameter, for EsaCL's ``isolate`` option) are excluded from the LMO (it picks its K
vertices among free entries only) and from the convex update and the norms of step 3: they stay
bit-identical, and the polytope constrains the free entries. Everything runs on the parameters'
device without host synchronisation.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.sparse.masks import topk_mask

RESCALES = ("gradient", "none")


def ksparse_lmo(m: torch.Tensor, k: int, radius: float, free: torch.Tensor | None = None) -> torch.Tensor:
    """``argmin_{v in C(k, radius)} <m, v>``: ``-radius * sign(m)`` on the ``k`` largest ``|m|``, 0 elsewhere.

    Always a vertex: exactly ``k`` non-zeros of magnitude ``radius`` (a zero ``m_i`` among the
    chosen ones gets ``-radius``, any sign being optimal there). With ``free`` (bool mask) the
    vertex lives on the free entries only (``k`` is capped at their number).
    """
    score = m.detach().abs()
    if free is not None:
        score = score.masked_fill(~free, -1.0)  # |m| >= 0 > -1: frozen entries are never picked
    chosen = topk_mask(score, int(k))
    r = torch.tensor(float(radius), dtype=m.dtype, device=m.device)
    return torch.where(chosen, torch.where(m > 0, -r, r), torch.zeros((), dtype=m.dtype, device=m.device))


def in_ksparse_polytope(theta: torch.Tensor, k: int, radius: float, *, rtol: float = 1e-5) -> bool:
    """Whether ``theta`` lies in ``C(k, radius)``: ``||theta||_inf <= radius`` and ``||theta||_1 <= k * radius``."""
    t = theta.detach().double()
    tol = rtol * float(radius)
    return bool(t.abs().max() <= radius + tol) and bool(t.abs().sum() <= k * radius + k * tol)


@torch.no_grad()
def expected_init_norm(module: nn.Module, param: str = "weight", *, samples: int = 10, seed: int = 0) -> float:
    """Mean L2 norm of ``module.<param>`` over ``samples`` fresh default initialisations.

    Computed on a separate CPU copy of the layer (``reset_parameters``), never by re-initialising
    the live one, and under a forked CPU random state with a fixed ``seed``, so the run's random
    stream is untouched and the value is the same on every machine.
    """
    if not hasattr(module, "reset_parameters"):
        raise SparseCLError(f"cannot compute the init norm of a {type(module).__name__}: it has no reset_parameters()")
    fresh = copy.deepcopy(module).to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        norms = []
        for _ in range(samples):
            fresh.reset_parameters()
            norms.append(float(getattr(fresh, param).detach().double().norm()))
    return sum(norms) / len(norms)


def ksparse_radius(module: nn.Module, k: int, tau: float, mode: str = "init") -> float:
    """Polytope radius of one layer: ``tau`` (``mode='radius'``) or ``tau * E||w_init||_2 / sqrt(k)`` (``'init'``)."""
    if mode == "radius":
        return float(tau)
    if mode == "init":
        return float(tau) * expected_init_norm(module) / math.sqrt(int(k))
    raise SparseCLError(f"unknown radius mode {mode!r} (known: init, radius)")


class StochasticFrankWolfe(torch.optim.Optimizer):
    """Stochastic Frank-Wolfe with K-sparse polytope constraints (see the module docstring).

    Args:
        params: parameters or parameter groups; a group with ``k`` (int) and ``radius`` (float)
            is constrained, one without (or with ``k=None``) takes plain SGD steps.
        lr: learning rate (the step-size factor of ``rescale='gradient'``, or the step size).
        momentum: ``mu`` of ``m <- mu * m + (1 - mu) * g``.
        rescale: ``'gradient'`` or ``'none'`` (see the module docstring).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, rescale: str = "gradient") -> None:
        if not lr > 0:
            raise SparseCLError(f"Frank-Wolfe lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise SparseCLError(f"Frank-Wolfe momentum must lie in [0, 1), got {momentum}")
        if rescale not in RESCALES:
            raise SparseCLError(f"unknown Frank-Wolfe rescale {rescale!r} (known: {', '.join(RESCALES)})")
        super().__init__(params, dict(lr=lr, momentum=momentum, rescale=rescale, k=None, radius=None))
        for g in self.param_groups:
            if g["k"] is not None:
                if g["radius"] is None or not g["radius"] > 0:
                    raise SparseCLError(f"a constrained group needs a radius > 0, got {g['radius']}")
                for p in g["params"]:
                    if not 1 <= int(g["k"]) <= p.numel():
                        raise SparseCLError(f"K={g['k']} outside [1, {p.numel()}] for a parameter of shape {tuple(p.shape)}")
        self.frozen: dict[torch.Tensor, torch.Tensor] = {}
        self._k_free: dict[torch.Tensor, int] = {}

    def set_frozen(self, param: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Freeze the entries of ``param`` where ``mask`` is True (``None`` unfreezes all).

        Counts the free entries once (one host sync) to cap K at their number.
        """
        if mask is None:
            self.frozen.pop(param, None)
            self._k_free.pop(param, None)
            return
        mask = mask.to(device=param.device, dtype=torch.bool)
        if mask.shape != param.shape:
            raise ValueError(f"frozen mask of shape {tuple(mask.shape)} for a parameter of shape {tuple(param.shape)}")
        self.frozen[param] = mask
        self._k_free[param] = int((~mask).sum())

    def constrained(self) -> list[tuple[torch.Tensor, int, float]]:
        """``(param, K, radius)`` of every constrained parameter."""
        return [(p, int(g["k"]), float(g["radius"])) for g in self.param_groups if g["k"] is not None for p in g["params"]]

    @torch.no_grad()
    def make_feasible_(self) -> None:
        """Move every constrained parameter (its free entries) into its polytope, if outside.

        Clips to ``[-r, r]`` and then scales down to L1 norm ``K * r`` if larger: a feasible
        point (not the Euclidean projection), a no-op for points already inside.
        """
        for p, k, r in self.constrained():
            frozen = self.frozen.get(p)
            free_vals = p if frozen is None else p.masked_fill(frozen, 0)
            clipped = free_vals.clamp(-r, r)
            l1 = clipped.abs().sum()
            scale = torch.clamp(k * r / l1.clamp_min(1e-30), max=1.0)
            new = clipped * scale
            p.copy_(new if frozen is None else torch.where(frozen, p, new))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, k, r = group["lr"], group["momentum"], group["k"], group["radius"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                frozen = self.frozen.get(p)
                g = p.grad if frozen is None else p.grad.masked_fill(frozen, 0)
                if k is None:  # unconstrained: plain SGD
                    upd = p - lr * g
                    p.copy_(upd if frozen is None else torch.where(frozen, p, upd))
                    continue
                state = self.state[p]
                m = state.get("momentum_buffer")
                if m is None:
                    m = state["momentum_buffer"] = g.detach().clone()
                else:
                    m.mul_(mu).add_(g, alpha=1.0 - mu)
                k_eff = min(int(k), self._k_free.get(p, p.numel()))
                free = None if frozen is None else ~frozen
                v = ksparse_lmo(m, k_eff, r, free)
                diff = v - p
                if frozen is not None:
                    diff = diff.masked_fill(frozen, 0)
                if group["rescale"] == "gradient":
                    eta = (lr * torch.linalg.vector_norm(m) / torch.linalg.vector_norm(diff).clamp_min(1e-30)).clamp(0.0, 1.0)
                else:
                    eta = min(max(float(lr), 0.0), 1.0)
                upd = p + eta * diff
                p.copy_(upd if frozen is None else torch.where(frozen, p, upd))
        return loss
