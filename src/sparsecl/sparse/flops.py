"""Training FLOPs of (sparse) conv/linear layers, counted step by step (SPEC, Metrics).

Per sample, layer ``l`` with ``macs_l`` dense multiply-adds, weight density ``w_l`` and gradient
density ``g_l`` costs (2 FLOPs per multiply-add):

- forward: ``2 * macs_l * w_l``
- backward: the input-gradient half costs as much as the forward (``2 * macs_l * w_l``) and the
  weight-gradient half ``2 * macs_l * g_l`` (``g_l = w_l`` unless a gradient mask is used),

so a dense training sample costs 3x its forward. Only convolutions and linear layers are
counted: BatchNorm, activations, pooling, residual additions, the optimiser update and mask
selection (scores, top-k) are omitted as negligible, as the spec allows.

Densities are plain Python floats set only when masks change, and a training step only adds
to an integer sample count, so counting never synchronises with the device; the per-layer sums
are brought up to date lazily whenever a density changes or a total is read.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LayerProfile:
    """Dense cost of one conv/linear layer for one sample.

    Attributes:
        name: module name (e.g. ``'backbone.layer1.0.conv1'``).
        kind: ``'conv'`` or ``'linear'``.
        weight: name of its weight parameter (e.g. ``'backbone.layer1.0.conv1.weight'``).
        macs: dense multiply-adds per sample (summed over calls if the module runs several times).
        out_numel: output elements per sample (``O*H*W`` or ``O``).
        n_weights: number of elements of the weight tensor.
    """

    name: str
    kind: str
    weight: str
    macs: int
    out_numel: int
    n_weights: int


def _layer_macs(module: nn.Module, out: torch.Tensor) -> tuple[int, int]:
    """(multiply-adds, output elements) of one call of ``module`` on the one-sample dummy batch."""
    out_numel = out.numel()  # the whole output belongs to the single sample, however it is reshaped
    if isinstance(module, nn.Linear):
        return out_numel * module.in_features, out_numel
    # conv: every output element needs (in_channels / groups) * prod(kernel) multiply-adds
    per_out = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return out_numel * per_out, out_numel


def profile_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerProfile]:
    """Dense per-sample cost of every ``nn.Conv{1,2,3}d`` / ``nn.Linear`` of ``model``.

    Runs one dummy sample of shape ``input_shape`` through ``model`` on its own device and dtype,
    in eval mode (so BatchNorm1d accepts a batch of 1) and without gradients; every module's
    train/eval flag is restored and the hooks are removed afterwards, even on error. Layers are
    listed in execution order; layers that did not run are appended with ``macs = 0``.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, _COUNTED)]
    stats: dict[str, list[int]] = {}  # name -> [macs, out_numel], in order of first call

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            macs, numel = _layer_macs(module, out)
            s = stats.setdefault(name, [0, 0])
            s[0] += macs
            s[1] += numel
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(make_hook(name)) for name, m in named]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)

    modules = dict(named)
    order = list(stats) + [name for name, _ in named if name not in stats]
    profiles = []
    for name in order:
        m = modules[name]
        macs, numel = stats.get(name, [0, 0])
        profiles.append(LayerProfile(
            name=name, kind="linear" if isinstance(m, nn.Linear) else "conv",
            weight=f"{name}.weight" if name else "weight",
            macs=int(macs), out_numel=int(numel), n_weights=int(m.weight.numel()),
        ))
    return profiles


class FlopCounter:
    """Accumulates training FLOPs at the layers' current weight/gradient densities.

    Call :meth:`set_density` whenever a mask changes, :meth:`train_samples` for samples that go
    through forward and backward, :meth:`forward_samples` for forward-only ones (stored logits, a
    teacher). :attr:`total` is the FLOPs spent, :attr:`dense_total` what the same samples would
    cost with every layer dense, :attr:`ratio` their quotient.
    """

    def __init__(self, layers: list[LayerProfile]) -> None:
        self.layers = list(layers)
        self._index = {p.weight: i for i, p in enumerate(self.layers)}
        n = len(self.layers)
        self._w = [1.0] * n
        self._g = [1.0] * n
        self._flops = [0.0] * n  # per layer, at the densities in force when the samples ran
        self._dense = [0] * n
        self._pending_train = 0  # samples since the last flush (densities unchanged since)
        self._pending_fwd = 0
        self.n_train_samples = 0
        self.n_forward_samples = 0

    # -- counting -------------------------------------------------------------------------
    def set_density(self, weight_name: str, weight: float, grad: float | None = None) -> None:
        """Set the fraction of active weights (and of weight gradients computed) of one layer.

        ``weight_name`` is the parameter name (``LayerProfile.weight``); ``grad`` defaults to
        ``weight``. Pass Python floats (e.g. computed once from the mask when it changes).
        """
        try:
            i = self._index[weight_name]
        except KeyError:
            raise KeyError(f"no profiled conv/linear layer has weight {weight_name!r}") from None
        w = float(weight)
        g = w if grad is None else float(grad)
        if not (0.0 <= w <= 1.0 and 0.0 <= g <= 1.0):
            raise ValueError(f"densities must lie in [0, 1], got weight {w}, grad {g} for {weight_name!r}")
        self._flush()
        self._w[i], self._g[i] = w, g

    def density(self, weight_name: str) -> tuple[float, float]:
        """Current ``(weight density, gradient density)`` of one layer."""
        i = self._index[weight_name]
        return self._w[i], self._g[i]

    def train_samples(self, n: int) -> None:
        """Count ``n`` samples of forward + backward at the current densities."""
        self._pending_train += int(n)
        self.n_train_samples += int(n)

    def forward_samples(self, n: int) -> None:
        """Count ``n`` forward-only samples at the current weight densities."""
        self._pending_fwd += int(n)
        self.n_forward_samples += int(n)

    def _flush(self) -> None:
        nt, nf = self._pending_train, self._pending_fwd
        if not (nt or nf):
            return
        for i, p in enumerate(self.layers):
            fwd = 2.0 * p.macs * self._w[i]
            self._flops[i] += nt * (2.0 * fwd + 2.0 * p.macs * self._g[i]) + nf * fwd
            self._dense[i] += (6 * nt + 2 * nf) * p.macs
        self._pending_train = self._pending_fwd = 0

    # -- results --------------------------------------------------------------------------
    @property
    def total(self) -> float:
        """FLOPs spent so far."""
        self._flush()
        return float(sum(self._flops))

    @property
    def dense_total(self) -> float:
        """FLOPs the same samples would have cost with every layer dense."""
        self._flush()
        return float(sum(self._dense))

    @property
    def ratio(self) -> float:
        """``total / dense_total`` (1.0 before any sample is counted)."""
        dense = self.dense_total
        return self.total / dense if dense else 1.0

    def per_layer(self) -> dict[str, dict[str, float]]:
        """Per weight name: FLOPs, dense-equivalent FLOPs and current densities."""
        self._flush()
        return {
            p.weight: {"flops": self._flops[i], "dense_flops": float(self._dense[i]),
                       "weight_density": self._w[i], "grad_density": self._g[i], "macs": p.macs}
            for i, p in enumerate(self.layers)
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers (JSON/``torch.save(weights_only)`` safe) for checkpoints."""
        self._flush()
        return {
            "layers": [asdict(p) for p in self.layers],
            "weight_density": list(self._w), "grad_density": list(self._g),
            "flops": list(self._flops), "dense_flops": list(self._dense),
            "n_train_samples": self.n_train_samples, "n_forward_samples": self.n_forward_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the layer list must match this counter's."""
        names = [d["weight"] for d in state["layers"]]
        if names != [p.weight for p in self.layers]:
            raise ValueError("FLOP counter state was saved for a different set of layers")
        self._w = [float(v) for v in state["weight_density"]]
        self._g = [float(v) for v in state["grad_density"]]
        self._flops = [float(v) for v in state["flops"]]
        self._dense = [int(v) for v in state["dense_flops"]]
        self._pending_train = self._pending_fwd = 0
        self.n_train_samples = int(state["n_train_samples"])
        self.n_forward_samples = int(state["n_forward_samples"])
