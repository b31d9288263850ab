"""Honest efficiency accounting of masks: FLOP-counter densities, the sparsity and capacity reports.

- :func:`sparsity_report` is the ``result.json`` ``sparsity`` section: per conv/linear layer the
  mask density, gradient density and *measured* nonzero count, overall densities and mask bytes.
- :func:`capacity_report` is the ``capacity`` section (EsaCL eq. 6.24).
- :func:`parameter_densities` gives the all-parameter weight/gradient densities of the memory formula.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsecl.metrics.efficiency import CAPACITY_GAMMA, model_capacity
from sparsecl.sparse.flops import LayerProfile
from sparsecl.sparse.masks import MaskSet
from sparsecl.sparse.ownership import TaskOwnership


def parameter_densities(model: nn.Module, masks: MaskSet | None) -> tuple[float | None, float | None]:
    """``(1 - s, 1 - (s + q))`` over *all* parameters from the masks' counts (``None`` without masks).

    Unmasked parameters (biases, BatchNorm, dense layers) count as dense.
    """
    if masks is None:
        return None, None
    total = sum(p.numel() for p in model.parameters())
    off_w = sum(masks.numel(n) - masks.active(n) for n in masks.names)
    off_g = sum(masks.numel(n) - masks.grad_active(n) for n in masks.names)
    return (total - off_w) / total, (total - off_g) / total


@torch.no_grad()
def sparsity_report(model: nn.Module, layers: list[LayerProfile], masks: MaskSet | None = None,
                    ownership: TaskOwnership | None = None, *, policy: str | None = None) -> dict[str, Any]:
    """Per-layer and overall sparsity (plain Python numbers, JSON-safe).

    ``per_layer`` lists every profiled conv/linear weight: ``masked``, ``n``, ``active`` (mask
    count, or ``n`` for a dense layer), ``weight_density``, ``grad_density`` and the measured
    ``nonzero`` count. ``overall.density`` is the active fraction over the masked layers (1.0 for
    a dense run), ``overall.conv_linear_density`` the same over every conv/linear weight and
    ``overall.nonzero_fraction`` the measured nonzero fraction of all parameters. Measuring costs
    one host sync per parameter; it runs once per task.
    """
    params = dict(model.named_parameters())
    masked = set(masks.names) if masks is not None else set()
    per_layer: dict[str, dict[str, Any]] = {}
    for p in layers:
        w = params.get(p.weight)
        if w is None:
            continue
        n = w.numel()
        is_masked = p.weight in masked
        active = masks.active(p.weight) if is_masked else n
        g_active = masks.grad_active(p.weight) if is_masked else n
        per_layer[p.weight] = {
            "masked": is_masked, "n": n, "active": active, "weight_density": active / n,
            "grad_density": g_active / n, "nonzero": int(torch.count_nonzero(w)),
        }
    n_all = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    cl_n = sum(v["n"] for v in per_layer.values())
    cl_active = sum(v["active"] for v in per_layer.values())
    overall = {
        "density": masks.density() if masks is not None and len(masks) else 1.0,
        "grad_density": masks.grad_density() if masks is not None and len(masks) else 1.0,
        "masked_weights": masks.numel() if masks is not None else 0,
        "conv_linear_density": cl_active / cl_n if cl_n else 1.0,
        "nonzero_fraction": nonzero / n_all if n_all else 1.0,
    }
    overall["sparsity"] = 1.0 - overall["density"]
    mask_bytes = masks.mask_bytes() if masks is not None else 0
    return {
        "policy": policy,
        "per_layer": per_layer,
        "overall": overall,
        "mask_bytes": mask_bytes,
        "task_mask_bytes": ownership.task_mask_bytes() if ownership is not None else 0,
        "note": "densities from the masks (exact counts); 'nonzero' measured on the weights",
    }


def capacity_report(sparsity: dict[str, Any], masks: MaskSet | None = None, ownership: TaskOwnership | None = None,
                    *, stored: tuple[int, int] | None = None, gamma: float = CAPACITY_GAMMA) -> dict[str, Any]:
    """EsaCL eq. 6.24 from a :func:`sparsity_report`: ``(1 - S) + (1 - gamma) * T / 32``.

    ``1 - S`` is the measured nonzero fraction of all parameters; ``T`` the number of masks the
    method stores (0 for a dense run, 1 for one shared mask, one per task under parameter
    isolation), or ``stored = (T, bytes)`` when the method says so (EsaCL's expand mode stores
    none: its zeros are the mask). ``mask_bytes`` are the real bytes of those masks as packed bitmasks.
    """
    nonzero = float(sparsity["overall"]["nonzero_fraction"])
    if stored is not None:
        n_masks, mask_bytes = stored
    elif ownership is not None:
        n_masks, mask_bytes = ownership.n_tasks, ownership.task_mask_bytes()
    elif masks is not None and len(masks):
        n_masks, mask_bytes = 1, masks.mask_bytes()
    else:
        n_masks, mask_bytes = 0, 0
    return {
        "value": model_capacity(1.0 - nonzero, n_masks, gamma),
        "formula": "(1 - S) + (1 - gamma) * T / 32 (EsaCL eq. 6.24)",
        "nonzero_fraction": nonzero,
        "gamma": gamma,
        "stored_masks": n_masks,
        "stored_mask_bytes": mask_bytes,
    }
