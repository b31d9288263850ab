"""Training FLOPs of (sparse) conv/linear layers, counted step by step (SPEC, Metrics).

Per sample, layer ``l`` with ``macs_l`` dense multiply-adds, weight density ``w_l`` and gradient
density ``g_l`` costs (2 FLOPs per multiply-add), under the default convention ``spec``:

- forward: ``2 * macs_l * w_l``
- backward: the input-gradient half costs as much as the forward (``2 * macs_l * w_l``) and the
  weight-gradient half ``2 * macs_l * g_l`` (``g_l = w_l`` unless a gradient mask is used),

so a dense training sample costs 3x its forward, replayed buffer samples included. The convention
``sparcl-paper`` is the one under which SparCL's Table 1 comes out: a replayed sample is charged
one forward pass only, gradient masking scales the whole backward (``4 * macs_l * g_l``), and
passes outside the training steps (EWC's Fisher at a task's end) are not charged. Both are counted
at once, so a run (and ``sparsecl report``) can show either.

Selection cost is its own line: the backward passes that methods run only to score weights (SparCL's
importance gradients) are charged ``4 * macs_l * w_l`` per sample (every active weight's gradient)
under both conventions, apart from the training FLOPs. Only convolutions and linear layers are
counted: BatchNorm, activations, pooling, residual additions, the optimiser update and top-k are
omitted as negligible, as the spec allows.

Densities are plain Python floats set only when masks change, and a training step only adds
to integer sample counts, so counting never synchronises with the device. Per layer the counter
keeps integer sample counts per ``(weight density, gradient density)`` state and multiplies them
out when a total is read, in a fixed order: the same samples at the same densities give
bit-identical totals however the counting was interleaved (the planner relies on it).
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


CONVENTIONS = ("spec", "sparcl-paper")
# Sample categories, per layer and density state: training-step samples of the current data,
# replayed buffer samples of a training step, forward-only samples, training and forward-only
# samples outside the training steps (task-end passes), and selection backward passes.
_KINDS = ("train", "replay", "forward", "extra_train", "extra_forward", "selection")
_K = {k: i for i, k in enumerate(_KINDS)}


def check_convention(name: str) -> str:
    """``name`` if it is a FLOP convention, else ``ValueError`` naming the known ones."""
    if name not in CONVENTIONS:
        raise ValueError(f"unknown FLOP convention {name!r} (known: {', '.join(CONVENTIONS)})")
    return name


def _sample_costs(macs: int, w: float, g: float, convention: str) -> tuple[list[float], list[int]]:
    """(FLOPs, dense-equivalent FLOPs) of one sample of each kind of ``_KINDS`` for one layer."""
    fwd = 2.0 * macs * w
    if convention == "spec":
        train = 2.0 * fwd + 2.0 * macs * g
        cost = [train, train, fwd, train, fwd, 0.0]
        dense = [6 * macs, 6 * macs, 2 * macs, 6 * macs, 2 * macs, 0]
    else:  # sparcl-paper
        cost = [fwd + 4.0 * macs * g, fwd, fwd, 0.0, 0.0, 0.0]
        dense = [6 * macs, 2 * macs, 2 * macs, 0, 0, 0]
    return cost, dense


class FlopCounter:
    """Accumulates training FLOPs at the layers' current weight/gradient densities.

    Call :meth:`set_density` whenever a mask changes, :meth:`train_samples` for samples that go
    through forward and backward (``replay=True`` for buffer samples, ``extra=True`` outside the
    training steps), :meth:`forward_samples` for forward-only ones (stored logits, a teacher) and
    :meth:`selection_samples` for backward passes that only score weights. :attr:`total` is the
    training FLOPs spent under ``convention``, :attr:`dense_total` what the same samples would cost
    with every layer dense, :attr:`ratio` their quotient; :meth:`totals` gives any convention.
    """

    def __init__(self, layers: list[LayerProfile], convention: str = "spec") -> None:
        self.layers = list(layers)
        self.convention = check_convention(convention)
        self._index = {p.weight: i for i, p in enumerate(self.layers)}
        n = len(self.layers)
        self._w = [1.0] * n
        self._g = [1.0] * n
        # per layer: (weight density, grad density) -> sample count per kind of _KINDS
        self._tally: list[dict[tuple[float, float], list[int]]] = [{} for _ in range(n)]
        self._pending = [0] * len(_KINDS)  # samples since the last flush (densities unchanged since)
        self.n_train_samples = 0
        self.n_forward_samples = 0
        self.n_replay_samples = 0
        self.n_selection_samples = 0

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
        if (w, g) != (self._w[i], self._g[i]):
            self._flush()
            self._w[i], self._g[i] = w, g

    def density(self, weight_name: str) -> tuple[float, float]:
        """Current ``(weight density, gradient density)`` of one layer."""
        i = self._index[weight_name]
        return self._w[i], self._g[i]

    def train_samples(self, n: int, *, replay: bool = False, extra: bool = False) -> None:
        """Count ``n`` samples of forward + backward at the current densities: of the current
        data (default), replayed from a buffer (``replay``) or outside the training steps (``extra``)."""
        self._pending[_K["extra_train" if extra else "replay" if replay else "train"]] += int(n)
        self.n_train_samples += int(n)
        if replay:
            self.n_replay_samples += int(n)

    def forward_samples(self, n: int, *, extra: bool = False) -> None:
        """Count ``n`` forward-only samples at the current weight densities."""
        self._pending[_K["extra_forward" if extra else "forward"]] += int(n)
        self.n_forward_samples += int(n)

    def selection_samples(self, n: int) -> None:
        """Count ``n`` samples of a backward pass that computes every active weight's gradient
        only to score weights (selection cost, reported apart from the training FLOPs)."""
        self._pending[_K["selection"]] += int(n)
        self.n_selection_samples += int(n)

    def _flush(self) -> None:
        if not any(self._pending):
            return
        for i in range(len(self.layers)):
            counts = self._tally[i].setdefault((self._w[i], self._g[i]), [0] * len(_KINDS))
            for k, v in enumerate(self._pending):
                counts[k] += v
        self._pending = [0] * len(_KINDS)

    # -- results --------------------------------------------------------------------------
    def _layer_totals(self, i: int, convention: str) -> tuple[float, float, float]:
        """(training FLOPs, dense-equivalent, selection FLOPs) of layer ``i``, summed in a fixed order."""
        macs = self.layers[i].macs
        flops = dense = select = 0.0
        for (w, g), counts in sorted(self._tally[i].items()):
            cost, dcost = _sample_costs(macs, w, g, convention)
            flops += sum(c * n for c, n in zip(cost, counts))
            dense += sum(c * n for c, n in zip(dcost, counts))
            select += 4.0 * macs * w * counts[_K["selection"]]
        return flops, dense, select

    def totals(self, convention: str | None = None) -> dict[str, float]:
        """``train``, ``dense_equivalent`` and ``selection`` FLOPs so far under ``convention``
        (default: the counter's own)."""
        conv = check_convention(convention or self.convention)
        self._flush()
        parts = [self._layer_totals(i, conv) for i in range(len(self.layers))]
        return {"train": float(sum(p[0] for p in parts)), "dense_equivalent": float(sum(p[1] for p in parts)),
                "selection": float(sum(p[2] for p in parts))}

    @property
    def total(self) -> float:
        """Training FLOPs spent so far (selection passes excluded: see :attr:`selection`)."""
        return self.totals()["train"]

    @property
    def dense_total(self) -> float:
        """FLOPs the same samples would have cost with every layer dense."""
        return self.totals()["dense_equivalent"]

    @property
    def selection(self) -> float:
        """FLOPs of the selection backward passes so far (the same under both conventions)."""
        return self.totals()["selection"]

    @property
    def ratio(self) -> float:
        """``total / dense_total`` (1.0 before any sample is counted)."""
        t = self.totals()
        return t["train"] / t["dense_equivalent"] if t["dense_equivalent"] else 1.0

    def per_layer(self) -> dict[str, dict[str, float]]:
        """Per weight name: FLOPs, dense-equivalent FLOPs and current densities (own convention)."""
        self._flush()
        out = {}
        for i, p in enumerate(self.layers):
            flops, dense, _ = self._layer_totals(i, self.convention)
            out[p.weight] = {"flops": flops, "dense_flops": dense, "weight_density": self._w[i],
                             "grad_density": self._g[i], "macs": p.macs}
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers (JSON/``torch.save(weights_only)`` safe) for checkpoints."""
        self._flush()
        return {
            "layers": [asdict(p) for p in self.layers], "convention": self.convention,
            "weight_density": list(self._w), "grad_density": list(self._g),
            "tally": [[[w, g, *counts] for (w, g), counts in sorted(t.items())] for t in self._tally],
            "n_train_samples": self.n_train_samples, "n_forward_samples": self.n_forward_samples,
            "n_replay_samples": self.n_replay_samples, "n_selection_samples": self.n_selection_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the layer list must match this counter's."""
        names = [d["weight"] for d in state["layers"]]
        if names != [p.weight for p in self.layers]:
            raise ValueError("FLOP counter state was saved for a different set of layers")
        if "tally" not in state:
            raise ValueError("FLOP counter state predates per-density tallies (saved by an older sparsecl)")
        self._w = [float(v) for v in state["weight_density"]]
        self._g = [float(v) for v in state["grad_density"]]
        self._tally = [{(float(r[0]), float(r[1])): [int(v) for v in r[2:]] for r in t} for t in state["tally"]]
        self._pending = [0] * len(_KINDS)
        self.n_train_samples = int(state["n_train_samples"])
        self.n_forward_samples = int(state["n_forward_samples"])
        self.n_replay_samples = int(state["n_replay_samples"])
        self.n_selection_samples = int(state["n_selection_samples"])
