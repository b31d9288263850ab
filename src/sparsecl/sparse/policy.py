"""Which weights of a model are maskable: :class:`MaskPolicy` and its presets (SPEC, Sparse core).

Presets:

- ``conv-linear`` (SPEC default): every convolution and linear weight except the first
  convolution (the stem), the 1x1 convolutions of residual shortcuts and the classifier head.
- ``residual-3x3``: only the 3x3 convolutions inside residual blocks (what the SparCL code masks
  on ResNet-18: ``layerN.M.conv1`` and ``layerN.M.conv2``; stem, shortcuts and head stay dense).

Biases, BatchNorm and every other parameter are never masked. The ``include_*`` options add the
excluded groups back (they apply to both presets). Layers are matched by module type and name:

- *first convolution*: the first ``nn.Conv1d/2d/3d`` in ``model.named_modules()`` order (module
  registration order, which is the stem for every shipped backbone). Models without convolutions
  (the MLP) have no stem to exclude, so their first linear layer is maskable.
- *shortcut*: a 1x1 convolution whose qualified name has a ``shortcut`` or ``downsample`` part.
- *head*: everything under a top-level ``head`` module (:class:`~sparsecl.models.ContinualNet`),
  or, for a bare module without one, the last ``nn.Linear``.
- *residual block*: a module with a ``shortcut`` attribute (``BasicBlock``) or a
  ``use_residual`` attribute (MobileNetV2's inverted residual).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparsecl import SparseCLError

PRESETS = ("conv-linear", "residual-3x3")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SHORTCUT_PARTS = {"shortcut", "downsample"}


def _is_residual_block(module: nn.Module) -> bool:
    return hasattr(module, "shortcut") or hasattr(module, "use_residual")


@dataclass(frozen=True)
class MaskPolicy:
    """Selects the maskable weight parameters of a model.

    Attributes:
        preset: ``'conv-linear'`` or ``'residual-3x3'`` (see the module docstring).
        include_first: also mask the first convolution (the stem).
        include_shortcuts: also mask 1x1 shortcut convolutions.
        include_head: also mask the classifier head's weights.
    """

    preset: str = "conv-linear"
    include_first: bool = False
    include_shortcuts: bool = False
    include_head: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise SparseCLError(f"unknown mask policy {self.preset!r} (known: {', '.join(PRESETS)})")

    def select(self, model: nn.Module) -> list[str]:
        """Names of the maskable weight parameters of ``model``, in ``named_modules`` order.

        Raises:
            SparseCLError: if the policy selects no layer of this model (e.g. ``residual-3x3`` on
                an MLP), as a sparse method would then silently train a dense network.
        """
        modules = list(model.named_modules())
        first_conv = next((name for name, m in modules if isinstance(m, _CONV)), None)
        head_prefix = "head." if isinstance(getattr(model, "head", None), nn.Module) else None
        last_linear = None
        if head_prefix is None:
            linears = [name for name, m in modules if isinstance(m, nn.Linear)]
            last_linear = linears[-1] if linears else None
        in_block = self._residual_members(modules)
        out: list[str] = []
        for name, m in modules:
            if not isinstance(m, (*_CONV, nn.Linear)) or getattr(m, "weight", None) is None:
                continue
            is_conv = isinstance(m, _CONV)
            is_head = (head_prefix is not None and (name + ".").startswith(head_prefix)) or name == last_linear
            is_shortcut = (is_conv and all(k == 1 for k in m.kernel_size)
                           and bool(_SHORTCUT_PARTS & set(name.split("."))))
            is_first = name == first_conv
            if is_head:
                keep = self.include_head
            elif is_shortcut:
                keep = self.include_shortcuts
            elif is_first:
                keep = self.include_first
            elif self.preset == "residual-3x3":
                keep = is_conv and tuple(m.kernel_size) == (3, 3) and name in in_block
            else:
                keep = True
            if keep:
                out.append(f"{name}.weight" if name else "weight")
        if not out:
            raise SparseCLError(
                f"mask policy {self.describe()} selects no layer of this model "
                f"({type(getattr(model, 'backbone', model)).__name__}); use policy conv-linear"
            )
        return out

    @staticmethod
    def _residual_members(modules: list[tuple[str, nn.Module]]) -> set[str]:
        blocks = [name for name, m in modules if name and _is_residual_block(m)]
        return {name for name, _ in modules if any(name.startswith(b + ".") for b in blocks)}

    def describe(self) -> str:
        """Short text, e.g. ``'conv-linear'`` or ``'conv-linear+head'``."""
        extra = [n for n, on in (("first", self.include_first), ("shortcuts", self.include_shortcuts),
                                 ("head", self.include_head)) if on]
        return "+".join([self.preset, *extra])
