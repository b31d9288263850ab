"""Drop and grow: the topology updates of dynamic sparse training (SPEC, Sparse core).

- Drop: deactivate the ``k`` active weights with the lowest score (``|w|`` by default, or any
  importance score, e.g. SparCL's CWI).
- Grow ``k`` inactive weights by one of :data:`GROWTH_MODES`:

  ``random``    uniformly among inactive weights;
  ``unfired``   uniformly among weights that were never active (the ever-active mask); if fewer
                than ``k`` exist the rest is grown at random among the other inactive weights,
                so counts stay exact;
  ``gradient``  largest ``|dense gradient|`` (RigL);
  ``momentum``  largest ``|optimiser momentum|`` (SNFS; SGD ``momentum_buffer``, Adam ``exp_avg``,
                or Adam's normalised first moment ``exp_avg / (sqrt(exp_avg_sq) + eps)`` where a
                method asks for it: :func:`optimizer_momentum` with ``normalised=True``).

Every selection is a top-k, so exactly ``k`` weights change (never coin flips). Grown weights
start at zero and, if an optimiser is given, with zero optimiser state. As in RigL, weights
dropped in an update may be regrown in the same update (then they restart from zero).

All of this runs on the parameters' device; with the candidate count known from the masks'
Python-side counts (random/gradient/momentum without an ``allowed`` restriction) an update does
not synchronise with the host.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from sparsecl import SparseCLError
from sparsecl.sparse.masks import MaskSet, topk_mask

class GrowthInputs(NamedTuple):
    """What a growth score may read (the candidates are the inactive, allowed weights)."""

    mask: torch.Tensor
    candidates: torch.Tensor
    grad: torch.Tensor | None
    momentum: torch.Tensor | None
    ever_active: torch.Tensor | None
    generator: torch.Generator | None


def _random_score(g: GrowthInputs) -> torch.Tensor:
    return torch.rand(g.mask.shape, device=g.mask.device, generator=g.generator)


def _unfired_score(g: GrowthInputs) -> torch.Tensor:
    if g.ever_active is None:
        raise SparseCLError("unfired growth needs the ever-active mask")
    # Never-active candidates first (score + 2), then the other inactive ones (rand in [0, 1)).
    return _random_score(g) + 2.0 * (g.candidates & ~g.ever_active)


def _gradient_score(g: GrowthInputs) -> torch.Tensor:
    if g.grad is None:
        raise SparseCLError("gradient growth needs the dense gradient (none was computed)")
    return g.grad.detach().abs().float()


def _momentum_score(g: GrowthInputs) -> torch.Tensor:
    if g.momentum is None:
        raise SparseCLError("momentum growth needs the optimiser's momentum buffer")
    return g.momentum.detach().abs().float()


# Growth mode -> the score whose top-k candidates grow.
GROWTH_SCORES: dict[str, Callable[[GrowthInputs], torch.Tensor]] = {
    "random": _random_score, "unfired": _unfired_score, "gradient": _gradient_score, "momentum": _momentum_score,
}
GROWTH_MODES = tuple(GROWTH_SCORES)
_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def cosine_update_fraction(step: int, alpha: float, t_end: int) -> float:
    """RigL's drop fraction ``alpha / 2 * (1 + cos(pi * step / t_end))``; 0 from ``t_end`` on."""
    if t_end <= 0 or step >= t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / t_end))


def drop_lowest(mask: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """New mask without the ``k`` active entries of lowest ``score`` (``k`` <= active count)."""
    if k <= 0:
        return mask.clone()
    s = score.detach().float().masked_fill(~mask, float("inf"))
    drop = ~topk_mask(-s, k)  # the k smallest scores (inactive ones are +inf, never picked)
    return mask & drop


def optimizer_momentum(optimizer: torch.optim.Optimizer, param: torch.Tensor, *, normalised: bool = False) -> torch.Tensor:
    """The optimiser's first-moment buffer of ``param`` (SGD ``momentum_buffer``, Adam(W) ``exp_avg``).

    With ``normalised``, Adam's first moment is divided by ``sqrt(exp_avg_sq) + eps`` (the group's
    eps), the quantity sparse-learning codes (SNFS, the continual-DST authors') rank by; SGD's
    buffer has no second moment and is returned as is.

    Raises:
        SparseCLError: if the optimiser keeps none for it yet (plain SGD, or before the first step).
    """
    state = optimizer.state.get(param, {})
    for key in ("momentum_buffer", "exp_avg"):
        buf = state.get(key)
        if isinstance(buf, torch.Tensor):
            if normalised and key == "exp_avg":
                eps = next(g.get("eps", 1e-8) for g in optimizer.param_groups if any(q is param for q in g["params"]))
                return buf / (state["exp_avg_sq"].sqrt() + eps)
            return buf
    raise SparseCLError("momentum growth needs an optimiser with momentum (SGD momentum > 0 or Adam) "
                        "that has taken at least one step")


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero the optimiser's per-weight state (momentum, Adam moments) of ``param`` at ``where``."""
    state = optimizer.state.get(param, {})
    for key in _STATE_KEYS:
        buf = state.get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            buf.masked_fill_(where, 0)


def grow(
    mask: torch.Tensor,
    k: int,
    mode: str,
    *,
    grad: torch.Tensor | None = None,
    momentum: torch.Tensor | None = None,
    ever_active: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    n_candidates: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Choose ``k`` inactive weights to activate.

    Args:
        mask: current bool mask; only entries where it is False are candidates.
        k: how many to grow.
        mode: one of :data:`GROWTH_MODES`.
        grad: dense gradient (``gradient`` mode). momentum: first-moment buffer (``momentum`` mode).
        ever_active: weights ever active (``unfired`` mode).
        allowed: optional bool restriction of the candidates (e.g. weights free of other tasks).
        n_candidates: number of candidates if the caller knows it (saves a host sync); otherwise
            counted when ``allowed`` is given (without it, the caller guarantees ``k`` <= inactive).
        generator: RNG for ``random``/``unfired``.

    Returns:
        ``(grown, n)``: a bool mask of the ``n`` grown weights (disjoint from ``mask``); ``n == k``
        unless ``allowed`` leaves fewer candidates.
    """
    if mode not in GROWTH_MODES:
        raise SparseCLError(f"unknown growth mode {mode!r} (known: {', '.join(GROWTH_MODES)})")
    cand = ~mask if allowed is None else (~mask & allowed)
    if n_candidates is None and allowed is not None:
        n_candidates = int(cand.sum())
    if n_candidates is not None:
        k = min(int(k), int(n_candidates))
    if k <= 0:
        return torch.zeros_like(mask), 0
    score = GROWTH_SCORES[mode](GrowthInputs(mask, cand, grad, momentum, ever_active, generator))
    return topk_mask(score.masked_fill(~cand, float("-inf")), k), k


@torch.no_grad()
def drop_and_grow_(
    masks: MaskSet,
    name: str,
    k: int,
    mode: str,
    *,
    drop_score: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    momentum: torch.Tensor | None = None,
    ever_active: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One topology update of parameter ``name``: drop ``k`` by ``drop_score`` (default ``|w|``), grow by ``mode``.

    The parameter's dropped and grown weights are set to zero, the grown weights' optimiser state
    (if ``optimizer``) is zeroed, and the mask set (its ever-active mask and bound FLOP counter)
    updated. ``grad`` defaults to the parameter's ``.grad``; ``momentum`` (the score of momentum
    growth) defaults to the optimiser's first moment (:func:`optimizer_momentum`).
    Returns the number of weights grown (``k`` unless ``allowed`` limits it; then the layer keeps
    fewer active weights).
    """
    param = masks.params[name]
    old = masks.masks[name]
    active = masks.active(name)
    k = max(0, min(int(k), active))
    score = param.abs() if drop_score is None else drop_score
    kept = drop_lowest(old, score, k)
    if mode == "momentum" and momentum is None:
        if optimizer is None:
            raise SparseCLError("momentum growth needs the optimizer")
        momentum = optimizer_momentum(optimizer, param)
    n_cand = None if allowed is not None else param.numel() - (active - k)
    grown, n = grow(kept, k, mode, grad=param.grad if grad is None else grad, momentum=momentum,
                    ever_active=masks.ever_active[name] if ever_active is None else ever_active,
                    allowed=allowed, n_candidates=n_cand, generator=generator)
    param.mul_(kept)  # dropped weights -> 0; grown ones were 0 (inactive) or dropped: start at 0
    if optimizer is not None:
        reset_optimizer_state_(optimizer, param, grown)
    masks.set_mask(name, kept | grown, count=active - k + n)
    return n
