"""Per-parameter boolean masks applied in place after each optimiser step (SPEC, Sparse core).

A :class:`MaskSet` holds one bool mask per masked parameter (same shape, same device), an
optional gradient mask per parameter (for gradient sparsity, e.g. SparCL's DGM), and the
*ever-active* mask (every weight that was active at some point, for "unfired" growth).

Usage in a training step (no per-forward overhead, no host synchronisation)::

    loss.backward()
    masks.apply_grads_()     # only if gradient masks are set (or mask_grads=True)
    optimizer.step()
    masks.apply_()           # inactive weights back to exactly zero

:meth:`MaskSet.hook_optimizer` registers both calls as optimizer step hooks, so a method's
``observe`` needs no change. Active counts are kept as Python ints (updated whenever a mask is
set), so densities, mask bytes and the FLOP counter's densities are read without touching the
device. Bind a :class:`~sparsecl.sparse.flops.FlopCounter` with :meth:`MaskSet.bind_flops` and
every mask change pushes the new densities into it.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from sparsecl.sparse.flops import FlopCounter


# Mask versions are unique across all mask sets, so a cached sparse-kernel index keyed by a version
# can never be mistaken for another set's (a freed set's id may be reused).
_VERSIONS = itertools.count(1)


def bitmask_bytes(numel: int) -> int:
    """Bytes of a packed bitmask of ``numel`` entries (1 bit each, rounded up to whole bytes)."""
    return (int(numel) + 7) // 8


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of ``score``) with exactly ``k`` True entries at the largest scores.

    Ties are broken by :func:`torch.topk` (deterministic for a given input and device).
    """
    flat = score.reshape(-1)
    k = int(k)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k={k} outside [0, {flat.numel()}]")
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=score.device)
    if k:
        out[torch.topk(flat, k, sorted=False).indices] = True
    return out.view(score.shape)


def random_mask(shape: torch.Size | tuple[int, ...], k: int, *, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask with exactly ``k`` True entries at uniformly random positions (not coin flips)."""
    numel = math.prod(shape)
    if not 0 <= int(k) <= numel:
        raise ValueError(f"k={k} outside [0, {numel}]")
    idx = torch.randperm(numel, device=device, generator=generator)[: int(k)]
    out = torch.zeros(numel, dtype=torch.bool, device=device)
    out[idx] = True
    return out.view(tuple(shape))


class MaskSet:
    """Boolean masks over some parameters of a model.

    Args:
        model: the model owning the parameters (masks live on each parameter's device).
        masks: parameter name -> bool tensor of the parameter's shape.
        mask_grads: also multiply gradients by the weight mask before the optimiser step (keeps
            optimiser state of inactive weights at zero; off by default so that dense gradients
            and momentum stay available for gradient/momentum growth).
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], *, mask_grads: bool = False) -> None:
        params = dict(model.named_parameters())
        unknown = [n for n in masks if n not in params]
        if unknown:
            raise KeyError(f"no parameter named {', '.join(map(repr, unknown))} in the model")
        self.names: list[str] = list(masks)
        self.params: dict[str, nn.Parameter] = {n: params[n] for n in self.names}
        self.masks: dict[str, torch.Tensor] = {}
        self.grad_masks: dict[str, torch.Tensor] = {}
        self.ever_active: dict[str, torch.Tensor] = {}
        self.mask_grads = bool(mask_grads)
        self._active: dict[str, int] = {}
        self._grad_active: dict[str, int] = {}
        self._flops: FlopCounter | None = None
        self._hooks: list[Any] = []
        # Bumped on every change of a weight or gradient mask: sparse kernels rebuild their index then.
        self._versions: dict[str, int] = {}
        self._dense_grad = False  # this step's backward computes every weight's gradient
        self._active_grads = 0  # > 0 inside active_weight_grads()
        for n in self.names:
            self.set_mask(n, masks[n], push=False)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_counts(cls, model: nn.Module, counts: Mapping[str, int], *, generator: torch.Generator | None = None,
                    **kwargs: Any) -> "MaskSet":
        """Random masks with exactly ``counts[name]`` active weights per parameter."""
        params = dict(model.named_parameters())
        masks = {n: random_mask(params[n].shape, k, device=params[n].device, generator=generator)
                 for n, k in counts.items()}
        return cls(model, masks, **kwargs)

    @classmethod
    def from_nonzero(cls, model: nn.Module, names: Iterable[str], **kwargs: Any) -> "MaskSet":
        """Masks of the nonzero weights of ``names`` (e.g. a loaded per-task view); fully dense
        parameters are left out."""
        params = dict(model.named_parameters())
        nonzero = {n: params[n].detach() != 0 for n in names}
        return cls(model, {n: m for n, m in nonzero.items() if not bool(m.all())}, **kwargs)

    @classmethod
    def from_scores(cls, model: nn.Module, scores: Mapping[str, torch.Tensor], counts: Mapping[str, int],
                    **kwargs: Any) -> "MaskSet":
        """Masks keeping the ``counts[name]`` highest-scoring weights of each parameter."""
        return cls(model, {n: topk_mask(scores[n], counts[n]) for n in counts}, **kwargs)

    # ------------------------------------------------------------------ applying
    @torch.no_grad()
    def apply_(self) -> None:
        """Multiply every masked parameter by its mask, in place (inactive weights become 0)."""
        if self.names:
            torch._foreach_mul_([self.params[n] for n in self.names], [self.masks[n] for n in self.names])

    @torch.no_grad()
    def apply_grads_(self) -> None:
        """Multiply gradients by the gradient masks (where set) or, with ``mask_grads``, the weight masks."""
        grads, masks = [], []
        for n in self.names:
            g = self.params[n].grad
            if g is None:
                continue
            m = self.grad_masks.get(n)
            if m is None and self.mask_grads:
                m = self.masks[n]
            if m is not None:
                grads.append(g)
                masks.append(m)
        if grads:
            torch._foreach_mul_(grads, masks)

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Register :meth:`apply_grads_` before and :meth:`apply_` after every ``optimizer.step()``.

        The hooks stay with that optimizer (a new optimizer per task needs a new call); they run
        inside a captured CUDA graph too, as they only launch device kernels.
        """
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.apply_grads_()))
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.apply_()))

    def unhook(self) -> None:
        """Remove every optimizer hook registered by :meth:`hook_optimizer`."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ changing masks
    def set_mask(self, name: str, mask: torch.Tensor, *, count: int | None = None, push: bool = True) -> None:
        """Replace the mask of ``name`` (a bool tensor of the parameter's shape).

        The stored mask tensor is updated in place (its storage never changes, so a captured
        CUDA graph sees the new mask). ``count`` is the number of True entries if the caller
        knows it (e.g. from a top-k); otherwise it is counted (one host synchronisation). The
        ever-active mask is updated and, if a FLOP counter is bound, its densities. The weights
        are *not* touched: call :meth:`apply_` (or zero new weights explicitly) afterwards.
        """
        p = self.params[name]
        if mask.shape != p.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter {tuple(p.shape)}")
        mask = mask.to(device=p.device, dtype=torch.bool)
        current = self.masks.get(name)
        if current is None:
            self.masks[name] = mask.clone()
        else:  # in place: a captured CUDA graph (and optimiser hooks) keep seeing the live mask
            current.copy_(mask)
        self._active[name] = int(mask.sum()) if count is None else int(count)
        ever = self.ever_active.get(name)
        if ever is None:
            self.ever_active[name] = mask.clone()
        else:
            ever.logical_or_(mask)
        if name in self.grad_masks:  # a gradient mask never covers inactive weights
            self.set_grad_mask(name, self.grad_masks[name], push=False)
        self._bump(name)
        if push:
            self.push_flops()

    def reset_ever_active_(self) -> None:
        """Forget earlier masks: the ever-active mask becomes the current mask (e.g. when "unfired"
        is to mean "not yet used during this task")."""
        for n in self.names:
            self.ever_active[n].copy_(self.masks[n])

    def set_grad_mask(self, name: str, grad_mask: torch.Tensor | None, *, count: int | None = None,
                      push: bool = True) -> None:
        """Set (or with ``None`` remove) the gradient mask of ``name``; it is intersected with the weight mask.

        ``count`` is the number of True entries of the intersection if known (else counted, one sync).
        """
        if grad_mask is None:
            self.grad_masks.pop(name, None)
            self._grad_active.pop(name, None)
        else:
            g = grad_mask.to(device=self.params[name].device, dtype=torch.bool) & self.masks[name]
            current = self.grad_masks.get(name)
            if current is None:
                self.grad_masks[name] = g
            else:  # in place, as for weight masks
                current.copy_(g)
            self._grad_active[name] = int(g.sum()) if count is None else int(count)
        self._bump(name)
        if push:
            self.push_flops()

    def clear_grad_masks(self) -> None:
        """Remove every gradient mask."""
        self.grad_masks.clear()
        self._grad_active.clear()
        for n in self.names:
            self._bump(n)
        self.push_flops()

    def _bump(self, name: str) -> None:
        self._versions[name] = next(_VERSIONS)

    def version(self, name: str) -> int:
        """A number that changes whenever the weight or gradient mask of ``name`` changes, unique
        across mask sets."""
        return self._versions[name]

    # ------------------------------------------------------------------ where gradients are computed
    def weight_grad_positions(self, name: str) -> torch.Tensor | None:
        """Where a backward must compute the weight gradient of ``name`` for this step's use of it:
        ``None`` for everywhere (a dense weight-gradient step, see :meth:`push_flops`), the weight
        mask inside :meth:`active_weight_grads`, else the gradient mask where set, else the weight
        mask. Real sparse kernels compute the weight gradient only there; the optimiser step is the
        same as the dense path's, as gradients outside the weight mask (or the gradient mask) never
        reach a weight (:meth:`apply_grads_` and :meth:`apply_`)."""
        if self._dense_grad:
            return None
        if not self._active_grads and name in self.grad_masks:
            return self.grad_masks[name]
        return self.masks[name]

    @contextmanager
    def active_weight_grads(self) -> Iterator[None]:
        """Backward passes inside the block need every active weight's gradient, whatever the
        gradient masks (e.g. importance scores read from extra ``autograd.grad`` calls)."""
        self._active_grads += 1
        try:
            yield
        finally:
            self._active_grads -= 1

    # ------------------------------------------------------------------ accounting
    def numel(self, name: str | None = None) -> int:
        """Number of weights of one masked parameter, or of all of them."""
        if name is not None:
            return self.params[name].numel()
        return sum(p.numel() for p in self.params.values())

    def active(self, name: str | None = None) -> int:
        """Active (unmasked) weights of one parameter, or of all of them (no device access)."""
        return self._active[name] if name is not None else sum(self._active.values())

    def density(self, name: str | None = None) -> float:
        """Fraction of active weights of one parameter, or over all masked parameters."""
        n = self.numel(name)
        return self.active(name) / n if n else 1.0

    def grad_active(self, name: str) -> int:
        """Weights of ``name`` whose gradient is computed: the gradient mask's count, else the active count."""
        return self._grad_active.get(name, self._active[name])

    def grad_density(self, name: str | None = None) -> float:
        """Fraction of weights of one parameter (or all masked ones) that receive a gradient."""
        if name is not None:
            return self.grad_active(name) / self.numel(name)
        total = self.numel()
        return sum(self.grad_active(n) for n in self.names) / total if total else 1.0

    def densities(self) -> dict[str, float]:
        """Weight density per masked parameter."""
        return {n: self.density(n) for n in self.names}

    def mask_bytes(self) -> int:
        """Storage of the weight masks as packed bitmasks (1 bit per weight)."""
        return sum(bitmask_bytes(self.numel(n)) for n in self.names)

    def bind_flops(self, counter: FlopCounter | None) -> None:
        """Push densities into ``counter`` now and after every later mask change (``None`` unbinds)."""
        self._flops = counter
        self.push_flops()

    def unbind_flops(self) -> None:
        """Unbind the FLOP counter, leaving the masked layers dense in it (the masks are lifted)."""
        counter, self._flops = self._flops, None
        for n in self._counted(counter):
            counter.set_density(n, 1.0)

    def _counted(self, counter: FlopCounter | None) -> list[str]:
        """The masked parameters that are profiled conv/linear weights of ``counter``."""
        known = set() if counter is None else {p.weight for p in counter.layers}
        return [n for n in self.names if n in known]

    def push_flops(self, counter: FlopCounter | None = None, *, dense_grad: bool = False) -> None:
        """Set the current weight/gradient density of every masked layer in the FLOP counter.

        ``counter`` defaults to the bound one. ``dense_grad``: charge a dense weight gradient
        (gradient density 1), for steps whose backward computes it for every weight (gradient or
        momentum growth); call it before the step's forward, and again without it afterwards. With
        the bound counter it also tells real sparse kernels to compute that dense gradient
        (:meth:`weight_grad_positions`), so what is charged is what is computed.
        Parameters that are not a profiled conv/linear weight are skipped.
        """
        if counter is None or counter is self._flops:
            self._dense_grad = dense_grad
        counter = counter or self._flops
        for n in self._counted(counter):
            counter.set_density(n, self.density(n), 1.0 if dense_grad else self.grad_density(n))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Bool tensors and ints only (safe for ``torch.load(weights_only=True)``)."""
        return {
            "masks": {n: self.masks[n] for n in self.names},
            "grad_masks": dict(self.grad_masks),
            "ever_active": {n: self.ever_active[n] for n in self.names},
            "active": dict(self._active),
            "grad_active": dict(self._grad_active),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same parameter names)."""
        if list(state["masks"]) != self.names:
            raise ValueError("mask state was saved for a different set of parameters")
        for n in self.names:
            self.masks[n].copy_(state["masks"][n])
            self.ever_active[n].copy_(state["ever_active"][n])
            self._active[n] = int(state["active"][n])
            self._bump(n)
        self.grad_masks = {n: m.to(self.params[n].device, torch.bool) for n, m in state["grad_masks"].items()}
        self._grad_active = {n: int(v) for n, v in state["grad_active"].items()}
        self.push_flops()

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        """``(name, mask)`` pairs."""
        return ((n, self.masks[n]) for n in self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"MaskSet({len(self.names)} parameters, density {self.density():.4f}, {self.mask_bytes()} mask bytes)"
