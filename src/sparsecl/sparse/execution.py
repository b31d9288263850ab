"""Real sparse execution on the CPU: masked layers run on the kernels of :mod:`sparsecl.sparse.kernels`
(SPEC, "Real sparse execution on the CPU").

:class:`SparseExecution` swaps the forward of a :class:`~sparsecl.models.ContinualNet`'s backbone
(an instance attribute; :meth:`SparseExecution.remove` restores the class's). Parameters, buffers
and the state dict stay the model's own, so checkpoints, resume, export and evaluation are
unchanged. Two ways to run:

- **batch-last** (ResNet-18 and the MLP): the whole backbone runs in ``[C, H, W, N]`` layout (batch
  innermost, the kernels' layout), BatchNorm, ReLU, shortcuts and pooling included; the input is
  converted once and the features once. Masked layers run on the sparse kernels with their mask's
  index; unmasked 3x3 convolutions (the stem) on the same kernels with a full index, unmasked 1x1
  convolutions and linears as dense matrix products.
- **per layer** (any other backbone): each masked conv/linear module converts its input to the
  kernels' layout and its output back (correct everywhere, but the conversions eat much of the gain).

The weight gradient is computed where :meth:`MaskSet.weight_grad_positions` says, read when the
backward reaches the layer: the mask, the gradient mask (DGM), or every weight on the steps whose
FLOPs are charged a dense weight gradient (RigL's and continual DST's growth steps). The index is
rebuilt only when the mask set reports a change (:meth:`MaskSet.version`).
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsecl import SparseCLError
from sparsecl.models.mlp import MLP
from sparsecl.models.resnet import BasicBlock, ResNet18
from sparsecl.sparse import kernels
from sparsecl.sparse.kernel_choice import KernelChoices, situation, time_paths
from sparsecl.sparse.masks import MaskSet

MaskSource = Callable[[], "MaskSet | None"]


def _geometry(module: nn.Module) -> dict:
    if isinstance(module, nn.Linear):
        return {}
    return {"stride": module.stride, "padding": module.padding, "groups": module.groups}


class KernelLayer:
    """One conv/linear module run on the sparse kernels: its index, rebuilt when its mask changes."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name  # the weight's parameter name
        self.module = module
        self._index: kernels.SparseConvIndex | None = None
        self._key: object = None
        self._grad_key: object = None

    def index(self, masks: MaskSet | None) -> kernels.SparseConvIndex:
        """The index of the layer's current mask (all weights when it has none)."""
        masked = masks is not None and self.name in masks.masks
        key = masks.version(self.name) if masked else "full"
        if key != self._key:
            w = self.module.weight
            mask = masks.masks[self.name] if masked else torch.ones_like(w, dtype=torch.bool)
            self._index = kernels.SparseConvIndex(mask.detach(), **_geometry(self.module))
            self._key, self._grad_key = key, None
        return self._index

    def set_weight_grad(self, masks: MaskSet | None) -> None:
        """Point the index's weight gradient at this backward's positions (see the module docstring)."""
        positions = None  # the index's own mask
        key: object = "full"
        if masks is not None and self.name in masks.masks:
            positions = masks.weight_grad_positions(self.name)
            if positions is None:  # a dense weight-gradient step
                positions, key = torch.ones_like(self.module.weight, dtype=torch.bool), "dense"
            else:
                key = (id(positions), masks.version(self.name))
        if key != self._grad_key:
            self._index.set_weight_grad(positions)
            self._grad_key = key

    def __call__(self, x: torch.Tensor, masks: MaskSet | None) -> torch.Tensor:
        m = self.module
        op = kernels.sparse_linear if isinstance(m, nn.Linear) else kernels.sparse_conv2d
        return self._hooked(op(x, m.weight, self.index(masks), m.bias), masks)

    def framed(self, xp: torch.Tensor, frame: kernels.Frame,
               masks: MaskSet | None) -> tuple[torch.Tensor, kernels.Frame]:
        """The (bias-free) convolution between frames, :func:`~sparsecl.sparse.kernels.framed_sparse_conv2d`."""
        if self.module.bias is not None:
            raise SparseCLError(f"sparse kernels: {self.name} has a bias; framed convolutions take none")
        y, out_frame = kernels.framed_sparse_conv2d(xp, frame, self.module.weight, self.index(masks))
        return self._hooked(y, masks), out_frame

    def _hooked(self, y: torch.Tensor, masks: MaskSet | None) -> torch.Tensor:
        if y.requires_grad:  # runs as the backward reaches this layer, before the kernel's backward
            y.register_hook(lambda g: self.set_weight_grad(masks))
        return y


# ---------------------------------------------------------------------- batch-last building blocks
def _batch_norm_args(bn: nn.modules.batchnorm._BatchNorm) -> tuple:
    """``(running_mean, running_var, use_batch_stats, momentum)`` for one forward of ``bn``, by
    nn.BatchNorm's own rules (this counts the batch in ``num_batches_tracked``)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return bn.running_mean if keep else None, bn.running_var if keep else None, use_batch, factor


def batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn`` on a batch-last ``[C, ...]`` tensor, with nn.BatchNorm's own running-statistics rules."""
    mean, var, use_batch, factor = _batch_norm_args(bn)
    y = F.batch_norm(x.reshape(1, x.shape[0], -1), mean, var, bn.weight, bn.bias, use_batch, factor, bn.eps)
    return y.view_as(x)


def batch_norm_relu(bn: nn.modules.batchnorm._BatchNorm, yp: torch.Tensor, frame: kernels.Frame,
                    padding: tuple[int, int],
                    residual: tuple[torch.Tensor, kernels.Frame] | None = None) -> tuple[torch.Tensor, kernels.Frame]:
    """``relu(bn(y) + residual)`` of frames into a new frame with a border of ``padding`` (the next
    convolution's), :func:`~sparsecl.sparse.kernels.batch_norm_relu` with ``bn``'s rules."""
    mean, var, use_batch, factor = _batch_norm_args(bn)
    return kernels.batch_norm_relu(yp, frame, bn.weight, bn.bias, mean, var, use_batch, factor, bn.eps, padding,
                                   residual)


def dense_pointwise(conv: nn.Conv2d, x: torch.Tensor, *, sampled: bool = False) -> torch.Tensor:
    """An unmasked 1x1 convolution of a batch-last tensor as one matrix product (``sampled``: ``x``
    is already the input at the convolution's stride)."""
    s = conv.stride
    if s != (1, 1) and not sampled:
        x = x[:, :: s[0], :: s[1]]
    c, h, w, n = x.shape
    y = torch.matmul(conv.weight.view(conv.out_channels, c), x.reshape(c, -1)).view(-1, h, w, n)
    return y if conv.bias is None else y + conv.bias.view(-1, 1, 1, 1)


def dense_linear(fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An unmasked linear layer of a batch-last ``[I, N]`` tensor."""
    if fc.bias is None:
        return fc.weight @ x
    return torch.addmm(fc.bias.unsqueeze(1), fc.weight, x)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1


# ---------------------------------------------------------------------- the executor
class SparseExecution:
    """Runs ``model``'s backbone with the sparse kernels while masks exist (see the module docstring).

    Args:
        model: a :class:`~sparsecl.models.ContinualNet` on the CPU.
        masks: returns the current mask set, or None while there is none (the dense forward runs).
        choices: ``auto`` mode: the kernels run only where these measured choices say they pay
            (:mod:`sparsecl.sparse.kernel_choice`); None: always.
    """

    def __init__(self, model: nn.Module, masks: MaskSource, *, choices: KernelChoices | None = None) -> None:
        if any(p.device.type != "cpu" for p in model.parameters()):
            raise SparseCLError("--sparse-kernels runs on the CPU only (use --device cpu)")
        kernels.load_extension()  # one clear error now if the kernels cannot be built
        self.model = model
        self.backbone = model.backbone
        self._masks = masks
        self._layers: dict[int, KernelLayer] = {}  # by id of the module
        self._runner = batch_last_runner(self.backbone)
        self.batch_last = self._runner is not None
        self.choices = choices
        # auto: per (unit, input shape, autograd, mode) the mask versions last seen and the choice then,
        # so a forward only rebuilds the situation's key when a mask changed
        self._chosen: dict[tuple, tuple[tuple[int, ...], bool]] = {}
        self._units: dict[int, tuple[list[nn.Module], list[str]]] = {}
        self._saved: list[nn.Module] = []

    @property
    def mode(self) -> str:
        """``batch-last`` or ``per-layer`` (see the module docstring)."""
        return "batch-last" if self.batch_last else "per-layer"

    def layer(self, module: nn.Module) -> KernelLayer:
        """The kernel layer of ``module`` (a conv or linear of the model)."""
        key = id(module)
        if key not in self._layers:
            self._layers[key] = KernelLayer(self._weight_name(module), module)
        return self._layers[key]

    def _weight_name(self, module: nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return f"{name}.weight"
        raise KeyError("module is not part of the model")

    def install(self) -> "SparseExecution":
        """Swap the forwards in; idempotent."""
        self.remove()
        if self.batch_last:
            self.backbone.forward = types.MethodType(self._batch_last_forward, self.backbone)
            self._saved.append(self.backbone)
            return self
        for m in self.backbone.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.forward = types.MethodType(self._per_layer_forward, m)
                self._saved.append(m)
        return self

    def remove(self) -> None:
        """Restore the class forwards."""
        for m in self._saved:
            del m.forward
        self._saved.clear()

    # ------------------------------------------------------------------ forwards
    def _batch_last_forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        masks = self._masks()
        run = self._runner
        if masks is None or not self._pays(backbone, x, masks, lambda s: run(self, backbone, s, masks)):
            return type(backbone).forward(backbone, x)
        return run(self, backbone, x, masks)

    def _per_layer_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        masks = self._masks()
        layer = self.layer(module)
        if (masks is None or layer.name not in masks.masks
                or not self._pays(module, x, masks, lambda s: self._on_kernels(module, layer, s, masks))):
            return type(module).forward(module, x)
        return self._on_kernels(module, layer, x, masks)

    def _pays(self, unit: nn.Module, x: torch.Tensor, masks: MaskSet, sparse: Callable) -> bool:
        """Whether ``unit`` (the batch-last backbone, or one layer) runs on the kernels here."""
        if self.choices is None:
            return True
        layers, names = self._unit_layers(unit)
        where = (id(unit), tuple(x.shape), torch.is_grad_enabled(), unit.training)
        versions = tuple(masks.version(n) if n in masks.masks else 0 for n in names)
        last = self._chosen.get(where)
        if last is not None and last[0] == versions:
            return last[1]

        def measure() -> tuple[float, float]:
            return time_paths(lambda s: type(unit).forward(unit, s), sparse, x, list(unit.parameters()),
                              list(unit.buffers()), input_grad=unit is not self.backbone)

        chosen = self.choices.choose(situation(unit, layers, x, masks, names), measure)
        self._chosen[where] = (versions, chosen)
        return chosen

    def _unit_layers(self, unit: nn.Module) -> tuple[list[nn.Module], list[str]]:
        """The conv/linear modules of ``unit`` and their weights' names (found once per unit)."""
        if id(unit) not in self._units:
            layers = [m for m in unit.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            self._units[id(unit)] = (layers, [self.layer(m).name for m in layers])
        return self._units[id(unit)]

    def _on_kernels(self, module: nn.Module, layer: KernelLayer, x: torch.Tensor, masks: MaskSet) -> torch.Tensor:
        """One layer on the kernels, converting its input to the kernels' layout and its output back."""
        if isinstance(module, nn.Linear):
            lead = x.shape[:-1]
            y = layer(x.reshape(-1, x.shape[-1]).t().contiguous(), masks)
            return y.t().reshape(*lead, -1)
        return layer(x.permute(1, 2, 3, 0).contiguous(), masks).permute(3, 0, 1, 2)

    def conv(self, conv: nn.Conv2d, x: torch.Tensor, masks: MaskSet) -> torch.Tensor:
        """A convolution of a batch-last tensor: sparse kernels, or a matrix product for a dense 1x1."""
        layer = self.layer(conv)
        if _is_pointwise(conv) and layer.name not in masks.masks:
            return dense_pointwise(conv, x)
        return layer(x, masks)

    def linear(self, fc: nn.Linear, x: torch.Tensor, masks: MaskSet) -> torch.Tensor:
        """A linear layer of a batch-last ``[I, N]`` tensor."""
        layer = self.layer(fc)
        return layer(x, masks) if layer.name in masks.masks else dense_linear(fc, x)


# ---------------------------------------------------------------------- backbones in batch-last layout
def _resnet18(ex: SparseExecution, net: ResNet18, x: torch.Tensor, masks: MaskSet) -> torch.Tensor:
    """ResNet-18 between frames: every BatchNorm + ReLU (with the block's shortcut added) writes the
    next convolution's padded input, and its backward the convolution's padded output gradient."""
    if x.shape[0] < kernels.LANES and not torch.is_grad_enabled():
        return _resnet18_small_batch(ex, net, x, masks)
    blocks = [b for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for b in stage]
    stem = ex.layer(net.conv1)
    xb = x.permute(1, 2, 3, 0)
    frame = stem.index(masks).geometry(*xb.shape[1:]).in_frame
    a, frame = batch_norm_relu(net.bn1, *stem.framed(kernels.into_frame(xb, frame), frame, masks),
                               blocks[0].conv1.padding)
    for i, block in enumerate(blocks):
        following = blocks[i + 1].conv1.padding if i + 1 < len(blocks) else (0, 0)
        a, frame = _basic_block(ex, block, a, frame, masks, following)
    return kernels.frame_values(a, frame).mean(dim=(1, 2)).t()


def _basic_block(ex: SparseExecution, block: BasicBlock, a: torch.Tensor, frame: kernels.Frame, masks: MaskSet,
                 following: tuple[int, int]) -> tuple[torch.Tensor, kernels.Frame]:
    """A BasicBlock from its input's frame to its output's, bordered for the following convolution."""
    y, f = ex.layer(block.conv1).framed(a, frame, masks)
    y, f = ex.layer(block.conv2).framed(*batch_norm_relu(block.bn1, y, f, block.conv2.padding), masks)
    residual = (a, frame)
    if len(block.shortcut):
        conv, bn = block.shortcut
        if _is_pointwise(conv) and ex.layer(conv).name not in masks.masks:
            r = dense_pointwise(conv, kernels.frame_values(a, frame, conv.stride), sampled=True)
        else:
            r = ex.conv(conv, kernels.frame_values(a, frame), masks)
        r = batch_norm(bn, r)
        residual = (r, kernels.Frame.plain(r))
    return batch_norm_relu(block.bn2, y, f, following, residual)


def _resnet18_small_batch(ex: SparseExecution, net: ResNet18, x: torch.Tensor, masks: MaskSet) -> torch.Tensor:
    """Inference of a batch below the vector width: the convolutions take the row kernels, which need
    plain tensors, so BatchNorm and ReLU run as torch ops."""
    out = F.relu(batch_norm(net.bn1, ex.conv(net.conv1, x.permute(1, 2, 3, 0).contiguous(), masks)))
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in stage:
            y = F.relu(batch_norm(block.bn1, ex.conv(block.conv1, out, masks)))
            y = batch_norm(block.bn2, ex.conv(block.conv2, y, masks))
            if len(block.shortcut):
                out = batch_norm(block.shortcut[1], ex.conv(block.shortcut[0], out, masks))
            out = F.relu(y + out)
    return out.mean(dim=(1, 2)).t()


def _mlp(ex: SparseExecution, net: MLP, x: torch.Tensor, masks: MaskSet) -> torch.Tensor:
    out = x.reshape(x.shape[0], -1).t().contiguous()
    for m in net.net:
        if isinstance(m, nn.Linear):
            out = ex.linear(m, out, masks)
        elif isinstance(m, nn.ReLU):
            out = F.relu(out)
    return out.t()


def _plain_batchnorm(net: nn.Module) -> bool:
    return all(type(m) is nn.BatchNorm2d for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def batch_last_runner(net: nn.Module) -> Callable | None:
    """The batch-last forward of ``net``'s exact class, if there is one and its layers are the plain ones."""
    if type(net) is ResNet18 and _plain_batchnorm(net):
        return _resnet18
    if type(net) is MLP and all(isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU)) for m in net.net):
        return _mlp
    return None
