"""Sharpness-aware minimisation (SAM, Foret et al. ICLR 2021) as a two-pass step around any optimiser.

One SAM step on a loss ``L``:

1. *ascent*: with the gradient ``g = dL/dtheta`` of a first backward (EsaCL computes it on the
   support samples), perturb ``theta <- theta + eps`` with ``eps = rho * g / ||g||_2`` (one global
   norm over all parameters that have a gradient);
2. *descent*: a second forward/backward at ``theta + eps`` gives the sharpness-aware gradient;
   ``theta`` is restored bit-exactly (from a saved copy, not by subtracting ``eps``) and the base
   optimiser steps with that gradient (SGD, Adam, :class:`~sparsecl.optim.StochasticFrankWolfe`...).

Use it with a closure (``sam.step(closure)`` runs both passes), or call :meth:`SAM.first_step` and
:meth:`SAM.second_step` yourself around your own backward passes (EsaCL does). Both passes go
through the model, so a forward hook that counts samples (the engine's) sees the second pass's
samples too; SAM itself counts nothing.

Attributes other than SAM's own (``param_groups``, ``state``, ``register_step_post_hook``...)
are the base optimiser's, so hooks registered through a :class:`SAM` run around the real update.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from sparsecl import SparseCLError


class SAM:
    """Wraps ``base``: ``first_step`` perturbs the weights along the gradient, ``second_step`` restores
    them and lets ``base`` step with the gradient computed at the perturbed point.

    Args:
        base: the optimiser that takes the actual step.
        rho: radius of the perturbation (``||eps||_2 = rho``).
        params: the parameters to perturb (default: every parameter of ``base``).
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float, params: Iterable[torch.Tensor] | None = None) -> None:
        if not rho > 0:
            raise SparseCLError(f"SAM rho must be > 0, got {rho}")
        self.base = base
        self.rho = float(rho)
        self.params = list(params) if params is not None else [p for g in base.param_groups for p in g["params"]]
        self.last_eps_norm: torch.Tensor | None = None  # ||eps|| of the last ascent (a device scalar)
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __getattr__(self, name: str) -> Any:  # param_groups, state, hooks... are the base optimiser's
        return getattr(self.__dict__["base"], name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """``theta <- theta + rho * g / ||g||`` from the current gradients (saving ``theta``)."""
        if self._saved is not None:
            raise RuntimeError("SAM.first_step called twice without second_step")
        live = [p for p in self.params if p.grad is not None]
        if not live:
            raise RuntimeError("SAM.first_step needs gradients: call backward() first")
        grads = [p.grad for p in live]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        scale = self.rho / norm.clamp_min(1e-12)
        self._saved = [(p, p.detach().clone()) for p in live]
        for p, g in zip(live, grads):
            p.add_(g * scale.to(g.dtype))
        self.last_eps_norm = norm * scale  # rho unless the gradient vanished (then 0)
        if zero_grad:
            self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restore_(self) -> None:
        """Put back the weights saved by :meth:`first_step` (exact bits)."""
        if self._saved is None:
            return
        for p, saved in self._saved:
            p.copy_(saved)
        self._saved = None

    def second_step(self) -> None:
        """Restore ``theta`` and step the base optimiser with the current (perturbed-point) gradient."""
        if self._saved is None:
            raise RuntimeError("SAM.second_step called without first_step")
        self.restore_()
        self.base.step()

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The full two-pass step with ``closure`` (zero_grad + forward + backward, returns the
        loss); returns the loss at ``theta``."""
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss
