"""Capacity past the full network: reserve channels appended to a built model (SPEC "CL-LSG":
"the full-size tensors are the starting capacity, and growth past it adds channels").

:func:`widen_` gives every conv/linear layer of the backbone (stem and shortcuts included) more
output channels, the layers that read them more input channels, their BatchNorms and the heads'
inputs too. The network as designed keeps its exact initial weights (the reserve is appended,
drawn from its own seeded generator, leaving the global RNG untouched). While no reserve channel is
open, the gated layers compute the designed network's forward and backward bit for bit
(:class:`~sparsecl.sparse.gates.GateSet`). The designed widths are kept in
``model.allocation`` (layer name -> output channels); :func:`narrow` gives back the designed
network alone (e.g. CL-LSG's scratch template, model size's unit).

Layers whose outputs are added by a residual connection share a channel group
(:func:`~sparsecl.sparse.gates.layer_graph`) and are widened together. A fully connected layer after
a flatten reads ``channels x positions`` features, channel-major, so appending channels appends
whole blocks of features at the end and every designed feature keeps its index.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.models import ContinualNet, MultiHead
from sparsecl.sparse.gates import layer_graph
from sparsecl.sparse.policy import MaskPolicy

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def backbone_weights(model: nn.Module) -> list[str]:
    """Names of the backbone's conv/linear weights, stem and shortcuts included, heads excluded:
    the layers that gates (CL-LSG, Grow) act on and that :func:`widen_` widens."""
    return MaskPolicy("conv-linear", include_first=True, include_shortcuts=True).select(model)


def widen_(model: ContinualNet, factor: float, seed: int) -> None:
    """Append reserve output channels to every backbone layer: ``ceil(factor * width)`` in all.

    ``factor`` >= 1; the reserve's initial weights are the layers' default initialisation at their
    new shapes, drawn from a generator seeded with ``seed``. Records the designed widths in
    ``model.allocation``."""
    if not factor >= 1:
        raise SparseCLError(f"the allocated width must be at least the network's (factor >= 1), got {factor}")
    if model.allocation:
        raise SparseCLError("this model is widened already")
    model.allocation = _resize_(model, lambda group, width: math.ceil(factor * width), seed)


def narrow(model: ContinualNet) -> ContinualNet:
    """A copy of a widened model at its designed widths (``model.allocation``), reserve removed."""
    out = copy.deepcopy(model)
    if model.allocation:
        _resize_(out, lambda group, width: model.allocation[group], seed=None)
        out.allocation = {}
    return out


def _resize_(model: ContinualNet, new_width: Callable[[str, int], int], seed: int | None) -> dict[str, int]:
    """Give each channel group ``new_width(group, width)`` output channels (prefixes kept, the rest
    new); returns every layer's output width before (layer name -> channels)."""
    names = backbone_weights(model)
    modules = dict(model.named_modules())
    group, source, unit = layer_graph(model, names)
    before = {n[: -len(".weight")]: modules[n[: -len(".weight")]].weight.shape[0] for n in names}
    old = {g: before[g] for g in set(group.values())}
    widths = {g: new_width(g, w) for g, w in old.items()}
    with torch.random.fork_rng(devices=[]):  # the reserve's draws leave the run's RNG as it was
        if seed is not None:
            torch.manual_seed(seed)
        for n in names:
            layer = n[: -len(".weight")]
            m, s = modules[layer], source[layer]
            cols = m.weight.shape[1] if s is None else m.weight.shape[1] // old[s] * widths[s]
            _resize_layer_(m, widths[group[layer]], cols)
            if unit[layer] != layer:
                _resize_norm_(modules[unit[layer]], widths[group[layer]])
        last = group[names[-1][: -len(".weight")]]
        per_channel = model.feature_dim // old[last]
        features = widths[last] * per_channel
        multi = isinstance(model.head, MultiHead)
        for head in model.head.heads if multi else [model.head]:
            _resize_layer_(head, head.weight.shape[0], features)
    if multi:
        model.head.in_features = features
    model.feature_dim = model.backbone.feature_dim = features
    return before


def _resize_layer_(m: nn.Module, rows: int, cols: int) -> None:
    """Resize a conv/linear layer to ``rows`` outputs and ``cols`` inputs; the overlapping prefix
    keeps its values, new entries get the layer type's default initialisation."""
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        fresh: nn.Module = nn.Linear(cols, rows, bias=bias)
    elif isinstance(m, _CONV) and m.groups == 1:
        fresh = type(m)(cols, rows, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                        bias=bias, padding_mode=m.padding_mode)
    else:
        raise SparseCLError(f"cannot widen {type(m).__name__} (grouped convolutions are not supported)")
    fresh.to(device=m.weight.device, dtype=m.weight.dtype)
    o, i = min(rows, m.weight.shape[0]), min(cols, m.weight.shape[1])
    with torch.no_grad():
        fresh.weight[:o, :i] = m.weight[:o, :i]
        if bias:
            fresh.bias[:o] = m.bias[:o]
    m.weight, m.bias = fresh.weight, fresh.bias
    if isinstance(m, nn.Linear):
        m.in_features, m.out_features = cols, rows
    else:
        m.in_channels, m.out_channels = cols, rows


def _resize_norm_(bn: nn.Module, n: int) -> None:
    """Resize a BatchNorm to ``n`` channels (new ones: weight 1, bias 0, mean 0, variance 1)."""
    if not isinstance(bn, _BN):
        raise SparseCLError(f"cannot widen {type(bn).__name__}")
    k = min(n, bn.num_features)
    tensors = [*bn.parameters(), *bn.buffers()]
    fresh = type(bn)(n, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                     track_running_stats=bn.track_running_stats)
    if tensors:
        fresh.to(tensors[0].device)
    with torch.no_grad():
        for name, t in [*fresh.named_parameters(), *fresh.named_buffers()]:
            if name != "num_batches_tracked":
                t[:k] = getattr(bn, name)[:k]
            else:
                t.copy_(bn.num_batches_tracked)
    for name, t in fresh.named_parameters():
        setattr(bn, name, t)
    for name, t in fresh.named_buffers():
        setattr(bn, name, t)
    bn.num_features = n
