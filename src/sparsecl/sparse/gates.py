"""Learnable structural gates on conv/linear layers (CL-LSG; SPEC "CL-LSG").

Two gate kinds, both applied without changing parameter names or state-dict keys:

- :class:`ChannelGate` -- *grown-mask* m^g, one gate per output channel, by **continuous
  sparsification** (Yuan et al., ICLR 2021): ``gate = sigmoid(beta * s_c)`` with ``beta``
  annealed up over the task (``set_beta``), binarised at the end (``binarise_``: ``s_c > 0``).
  Channels already grown are fixed at 1, channels not allowed to grow at 0. The L0 surrogate
  penalty is ``lambda * sum(gates)`` over the learnable channels (:meth:`GateSet.penalty`).
- :class:`KernelGate` -- kernel-wise *attentive* / *selective* masks m^a / m^s: one gate per
  (out, in) kernel of a conv (one per weight of a linear layer), a Gumbel-sigmoid
  ``p = sigmoid((logit + g0 - g1) / T)`` thresholded at 0.5 in the forward pass (exactly 0/1) with
  a straight-through gradient through ``p``. Noise comes from a seeded ``torch.Generator``.
  Outside training (``module.eval()``) the gate is the noise-free threshold ``logit > 0``.
  (The paper writes the two-class Gumbel-softmax with log-probabilities ``log pi0`` and ``0``;
  we use the standard form with ``log pi1 = log(1 - pi0)``, whose log-odds are ``logit`` itself,
  so that the deterministic mask ``logit > 0`` is the most likely sample.)

Positions of both gates are either *learnable* or *fixed* to a 0/1 value (bool buffers), so one
method can freeze the masks of earlier tasks, learn new ones, and evaluate any task's stored masks.

:class:`GateSet` attaches the gates to a model: the kernel gate multiplies the weight inside the
layer's forward (``effective weight = weight * kernel_gate``, one multiply), the channel gate
multiplies the output channels of the layer's *unit* -- the BatchNorm that follows it when there
is one, so that a closed channel outputs exactly 0 (gating the conv weight alone would leave BN's
beta), else the layer itself (equivalent to gating its weight rows and bias).

Residual networks (:func:`layer_graph`): the layers whose outputs are added by a residual
connection (the stem, each block's last conv and its 1x1 shortcut) share **one channel gate per
residual stream** (per stage), so a channel of the stream is either grown in every branch or in
none; the blocks' inner convs (``conv1``) have their own gates.
"""
from __future__ import annotations

import types
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sparsecl import SparseCLError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def kernel_shape(weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the kernel-wise gate of a weight: ``(O, I, 1, ..)`` for convs, ``(O, I)`` for linear."""
    return tuple(weight_shape[:2]) + (1,) * (len(weight_shape) - 2)


class ChannelGate(nn.Module):
    """Grown-mask by continuous sparsification: one gate per output channel.

    Args:
        n: number of channels.
        init: initial ``s_c`` of the learnable channels (0 = gate 0.5 at ``beta = 1``).
    """

    def __init__(self, n: int, init: float = 0.0) -> None:
        super().__init__()
        self.init = float(init)
        self.s = nn.Parameter(torch.full((n,), self.init))
        self.register_buffer("on", torch.zeros(n, dtype=torch.bool))  # fixed at 1
        self.register_buffer("learn", torch.zeros(n, dtype=torch.bool))  # sigmoid(beta * s)
        self.beta = 1.0

    def set_beta(self, beta: float) -> None:
        """Temperature of the continuous relaxation (annealed up over the task)."""
        self.beta = float(beta)

    def soft(self) -> torch.Tensor:
        return torch.sigmoid(self.beta * self.s)

    def forward(self) -> torch.Tensor:
        """The gate values ``[n]`` (1 where fixed on, 0 where fixed off)."""
        return torch.where(self.on, 1.0, torch.where(self.learn, self.soft(), 0.0))

    def penalty(self) -> torch.Tensor:
        """Sum of the learnable gates (the L0 surrogate)."""
        return (self.soft() * self.learn).sum()

    @torch.no_grad()
    def start_growth_(self, allowed: torch.Tensor | None = None) -> None:
        """Make the closed channels (or those in ``allowed``) learnable, from ``s = init``."""
        grow = ~self.on if allowed is None else (~self.on & allowed)
        self.learn.copy_(grow)
        self.s.masked_fill_(grow, self.init)

    @torch.no_grad()
    def binarise_(self) -> torch.Tensor:
        """End of growth: learnable channels with ``s > 0`` (gate > 0.5) become fixed on.
        Returns the channels that were grown."""
        grown = self.learn & (self.s > 0)
        self.on |= grown
        self.learn.zero_()
        return grown


class KernelGate(nn.Module):
    """Kernel-wise Gumbel-sigmoid gate with a hard 0.5 threshold and straight-through gradient.

    The gate's logit is ``scale * score`` with ``score`` the learned parameter. Under Adam a
    parameter moves by about the learning rate per step whatever its gradient's size, so a logit
    moves by about ``scale * lr`` per step: ``scale`` is what lets a gate that starts open (logit
    ``init``, kept with probability ``sigmoid(init)`` under the noise) reach the threshold 0 within
    a task's steps at a small mask learning rate (see :func:`reach_scale`). The temperature cannot do
    this: the sampled hard mask is ``logit + noise > 0`` for every ``T``, and Adam normalises the
    ``1/T`` it puts on the gradient away.

    Args:
        shape: gate shape (:func:`kernel_shape` of the weight).
        generator: the seeded generator for the noise (on the weight's device).
        temperature: ``T`` of the Gumbel-sigmoid.
        init: initial logit of learnable positions (> 0 starts them open).
    """

    def __init__(self, shape: tuple[int, ...], generator: torch.Generator, temperature: float = 1.0,
                 init: float = 3.0) -> None:
        super().__init__()
        self.generator = generator
        self.temperature = float(temperature)
        self.init = float(init)
        self.scale = 1.0
        self.score = nn.Parameter(torch.full(shape, self.init))
        self.register_buffer("learn", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("value", torch.ones(shape))  # value of the fixed positions (0/1)

    def logit(self) -> torch.Tensor:
        return self.scale * self.score

    def forward(self, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
        """The gate, or its ``[:rows, :cols]`` corner (noise drawn for the corner only)."""
        logit, learn, value = self.logit(), self.learn, self.value
        if rows is not None:
            logit, learn, value = logit[:rows, :cols], learn[:rows, :cols], value[:rows, :cols]
        if self.training:
            u = torch.rand(logit.shape, generator=self.generator, device=logit.device)
            u = u.clamp_(1e-6, 1 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)  # g0 - g1 of two Gumbels = logistic noise
            p = torch.sigmoid((logit + noise) / self.temperature)
        else:
            p = torch.sigmoid(logit / self.temperature)
        hard = (p > 0.5).to(p.dtype)
        st = hard + (p - p.detach())  # forward exactly 0/1, backward d hard / d p := 1
        return torch.where(learn, st, value)

    @torch.no_grad()
    def configure_(self, learn: torch.Tensor, value: torch.Tensor, scale: float = 1.0) -> None:
        """Learnable positions (logits reset to ``init``, logit scale ``scale``) and the 0/1
        values of the fixed ones."""
        if not scale > 0:
            raise SparseCLError(f"kernel gate logit scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.learn.copy_(learn)
        self.value.copy_(value.to(self.value.dtype))
        self.score.masked_fill_(learn, self.init / self.scale)

    @torch.no_grad()
    def hard(self) -> torch.Tensor:
        """The binary mask now: ``logit > 0`` where learnable, the fixed value elsewhere."""
        return torch.where(self.learn, self.score > 0, self.value > 0.5)


def reach_scale(init: float, lr: float, steps: int) -> float:
    """Logit scale with which a gate moving by Adam's step ``lr`` per step covers ``init`` (from its
    initial logit to the threshold 0) in ``steps`` steps (at least 1: never slower than unscaled)."""
    return max(1.0, abs(init) / (lr * max(1, steps)))


def layer_graph(model: nn.Module, names: list[str]) -> tuple[dict[str, str], dict[str, str | None], dict[str, str]]:
    """Channel groups of the gated layers and where their inputs come from.

    Returns ``(group, source, unit)``: ``group[name]`` -- the channel-gate group of the layer's
    output (layers of one residual stream share a group); ``source[name]`` -- the group whose
    channels are the layer's input (``None`` = the data); ``unit[name]`` -- the module whose output
    the channel gate multiplies (the following BatchNorm, else the layer). Supports sequential
    backbones (MLP, LeNet, VGG) and residual blocks with ``conv1``, ``conv2`` and ``shortcut``.
    """
    modules = dict(model.named_modules())
    layers = [n[: -len(".weight")] for n in names]
    order = [n for n, _ in model.named_modules()]
    source: dict[str, str | None] = {}
    unit: dict[str, str] = {}
    for n in layers:  # unit = next BatchNorm before the next conv/linear, with matching width
        i = order.index(n)
        unit[n] = n
        for m in order[i + 1:]:
            mod = modules[m]
            if isinstance(mod, (*_CONV, nn.Linear)):
                break
            if isinstance(mod, _BN) and mod.num_features == modules[n].weight.shape[0]:
                unit[n] = m
                break
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    blocks = [n for n, m in modules.items() if hasattr(m, "shortcut") and hasattr(m, "conv1")]
    if any(hasattr(m, "use_residual") for m in modules.values()):
        raise SparseCLError("channel gates support sequential and ResNet backbones, not mobilenetv2")
    stream: str | None = None
    for n in layers:
        block = next((b for b in blocks if n.startswith(b + ".")), None)
        if block is None:
            source[n] = stream
            stream = n
            continue
        rel = n[len(block) + 1:]
        if rel == "conv1":
            source[n] = stream
            block_in = stream
        elif rel == "conv2":
            source[n] = block + ".conv1"
        elif rel.startswith("shortcut"):
            source[n] = block_in
        else:
            raise SparseCLError(f"unexpected layer {n} inside a residual block")
        if rel == "conv2":
            has_conv_shortcut = any(x.startswith(block + ".shortcut") for x in layers)
            if not has_conv_shortcut and block_in is not None:
                parent[find(n)] = find(block_in)  # identity shortcut: same stream as the input
            stream = n
        if rel.startswith("shortcut"):
            parent[find(n)] = find(block + ".conv2")
    # shortcut layers come after conv2 in registration order; resolve groups at the end
    out_group = {n: find(n) for n in layers}
    src = {n: (None if s is None else find(s)) for n, s in source.items()}
    return out_group, src, unit


class GateSet:
    """Channel and kernel gates attached to the conv/linear weights ``names`` of ``model``.

    Args:
        model: the model (parameter names and state-dict keys are unchanged).
        names: weight parameter names to gate (e.g. from :class:`~sparsecl.sparse.policy.MaskPolicy`).
        generator: seeded generator for the kernel gates' noise.
        temperature: Gumbel-sigmoid temperature.
        kernel_init: initial logit of learnable kernel gates.
        channel_init: initial ``s`` of growing channels.
        designed: the designed output width of layers that have reserve channels past it
            (``model.allocation``, :func:`sparsecl.sparse.capacity.widen_`).

    Reserve channels are computed only when used: while no reserve channel of a group is open or
    learning, its layers compute their designed channels alone (the rest of the output is zero,
    and readers skip it), bit for bit the network without a reserve (:meth:`refresh_active`).
    """

    def __init__(self, model: nn.Module, names: list[str], generator: torch.Generator, *,
                 temperature: float = 1.0, kernel_init: float = 3.0, channel_init: float = 0.0,
                 designed: dict[str, int] | None = None) -> None:
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        self.names = list(names)
        self.layers = {n: n[: -len(".weight")] for n in names}
        for n, layer in self.layers.items():
            if not isinstance(modules[layer], (*_CONV, nn.Linear)):
                raise SparseCLError(f"gates apply to conv and linear weights, not {n}")
        self.group, self.source, self.unit = layer_graph(model, names)
        self.groups = list(dict.fromkeys(self.group.values()))
        device = params[names[0]].device
        widths = {g: params[g + ".weight"].shape[0] for g in self.groups}
        self.width = widths
        self.designed = {g: (designed or {}).get(g, widths[g]) for g in self.groups}
        self.active = dict(widths)  # channels of each group the layers compute (refresh_active)
        self.channel = nn.ModuleDict({_key(g): ChannelGate(widths[g], channel_init) for g in self.groups}).to(device)
        self.kernel = nn.ModuleDict({
            _key(self.layers[n]): KernelGate(kernel_shape(params[n].shape), generator, temperature, kernel_init)
            for n in names
        }).to(device)
        for n in names:
            s = self.source[self.layers[n]]
            w = params[n].shape[1]
            if s is not None and w % widths[s]:
                raise SparseCLError(f"input width {w} of {n} is not a multiple of its source's {widths[s]} channels")
        self._originals: list[tuple[nn.Module, Any]] = []
        self._handles: list[Any] = []
        for n in names:
            self._attach_kernel(modules[self.layers[n]], self.layers[n])
        self.final = self.group[self.layers[names[-1]]]  # the group the heads read
        self.heads = {f"{n}.weight": m for n, m in modules.items()
                      if (n == "head" or n.startswith("head.")) and isinstance(m, nn.Linear)}
        if self.designed != widths:
            for h in self.heads.values():
                self._attach_reader(h)
        units: dict[str, str] = {}
        for n in names:
            units[self.unit[self.layers[n]]] = self.group[self.layers[n]]
        self.units = units  # module whose output a channel gate multiplies -> its gate group
        for u, g in units.items():
            gate = self.channel[_key(g)]
            self._handles.append(modules[u].register_forward_hook(_channel_hook(gate)))

    # ----------------------------------------------------------------- attaching
    def _attach_kernel(self, module: nn.Module, layer: str) -> None:
        gate = self.kernel[_key(layer)]
        conv = not isinstance(module, nn.Linear)

        def forward(self_: nn.Module, x: torch.Tensor) -> torch.Tensor:
            rows, cols = self.prefix(layer)
            w = self_.weight[:rows, :cols] * gate(rows, cols)
            b = None if self_.bias is None else self_.bias[:rows]
            x = x[:, :cols] if conv else x[..., :cols]
            y = self_._conv_forward(x, w, b) if conv else F.linear(x, w, b)
            return _pad_channels(y, self_.weight.shape[0] - rows)

        self._originals.append((module, module.__dict__.get("forward")))
        module.forward = types.MethodType(forward, module)

    def _attach_reader(self, head: nn.Linear) -> None:
        """A head reads only the computed prefix of the features."""
        def forward(self_: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            cols = self.features()
            return F.linear(x[..., :cols], self_.weight[:, :cols], self_.bias)

        self._originals.append((head, head.__dict__.get("forward")))
        head.forward = types.MethodType(forward, head)

    def detach(self) -> None:
        """Remove the gates from the model (plain layers again)."""
        for h in self._handles:
            h.remove()
        for module, original in self._originals:
            if original is None:
                del module.forward
            else:
                module.forward = original
        self._handles.clear()
        self._originals.clear()

    @torch.no_grad()
    def bake(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (the model's state dict) with the gates' current values multiplied in, so that
        the plain, ungated model computes what the gated one does. Kernel gates scale their weight;
        a channel gate scales its unit's per-channel affine output (BatchNorm ``weight``/``bias``,
        or the layer's own weight rows and bias): ``gate * (a x + b) == (gate a) x + gate b``.
        Exact for 0/1 gates (evaluation mode); a unit without an affine output cannot be baked."""
        out = dict(state)
        for n in self.names:
            out[n] = state[n] * self.kernel_gate(n)()
        for u, g in self.units.items():
            if f"{u}.weight" not in state:
                raise SparseCLError(f"cannot bake the channel gate of {u}: it has no affine output")
            on = self.channel_gate(g)()
            for key in (f"{u}.weight", f"{u}.bias"):
                if key in out:
                    t = out[key]
                    out[key] = t * on.view(-1, *([1] * (t.dim() - 1)))
        return out

    # --------------------------------------------------------------- reserve
    def refresh_active(self) -> None:
        """Compute a group's reserve channels only while one of them is open or learning (call
        after the channel gates' ``on``/``learn`` change)."""
        for g in self.groups:
            gate, d = self.channel_gate(g), self.designed[g]
            self.active[g] = self.width[g] if bool((gate.on[d:] | gate.learn[d:]).any()) else d

    def prefix(self, layer: str) -> tuple[int, int]:
        """``(rows, cols)`` of the layer's weight that its forward computes with now."""
        rows = self.active[self.group[layer]]
        cols = self.kernel[_key(layer)].score.shape[1]
        s = self.source[layer]
        return rows, cols if s is None else cols // self.width[s] * self.active[s]

    def features(self) -> int:
        """Number of the feature vector's entries the heads read now (the computed prefix)."""
        cols = next(iter(self.heads.values())).weight.shape[1] if self.heads else 0
        return cols // self.width[self.final] * self.active[self.final]

    def densities(self) -> dict[str, float]:
        """Share of each gated weight (and head weight) computed now, for the FLOP counter."""
        out = {}
        for n, layer in self.layers.items():
            rows, cols = self.prefix(layer)
            shape = self.kernel[_key(layer)].score.shape
            out[n] = rows * cols / (shape[0] * shape[1])
        for n, h in self.heads.items():
            out[n] = self.features() / h.weight.shape[1]
        return out

    # ------------------------------------------------------------------- access
    def channel_gate(self, group: str) -> ChannelGate:
        return self.channel[_key(group)]

    def kernel_gate(self, name: str) -> KernelGate:
        """Kernel gate of weight ``name``."""
        return self.kernel[_key(self.layers[name])]

    def parameters(self) -> Iterator[nn.Parameter]:
        """All gate parameters (for the mask optimiser)."""
        yield from self.channel.parameters()
        yield from self.kernel.parameters()

    def train(self, mode: bool = True) -> None:
        self.channel.train(mode)
        self.kernel.train(mode)

    def set_beta(self, beta: float) -> None:
        for g in self.channel.values():
            g.set_beta(beta)

    def penalty(self) -> torch.Tensor:
        """``sum`` of the learnable channel gates (multiply by lambda for the L0 surrogate)."""
        return sum(g.penalty() for g in self.channel.values())

    def channels_on(self) -> dict[str, torch.Tensor]:
        """Fixed-on channels of each group (copies)."""
        return {g: self.channel_gate(g).on.clone() for g in self.groups}

    def input_alive(self, name: str, on: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bool ``[I]`` of the input features of weight ``name`` that come from open channels."""
        layer = self.layers[name]
        s = self.source[layer]
        w = self.kernel_gate(name).score.shape[1]
        if s is None:
            return torch.ones(w, dtype=torch.bool, device=self.kernel_gate(name).score.device)
        return on[s].repeat_interleave(w // on[s].numel())  # flatten: channel-major features

    def alive(self, name: str, on: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bool kernel-shaped mask of kernels whose output and input channels are both open."""
        out = on[self.group[self.layers[name]]]
        inp = self.input_alive(name, on)
        a = out[:, None] & inp[None, :]
        return a.reshape(kernel_shape(tuple(a.shape) + (1,) * (self.kernel_gate(name).score.dim() - 2)))


def _key(name: str) -> str:
    return name.replace(".", "__")


def _pad_channels(y: torch.Tensor, n: int) -> torch.Tensor:
    """``y`` with ``n`` zero channels appended (dim 1)."""
    return y if n == 0 else F.pad(y, [0, 0] * (y.dim() - 2) + [0, n])


def _channel_hook(gate: ChannelGate):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        g = gate()
        return out * g.view(1, -1, *([1] * (out.dim() - 2)))
    return hook
