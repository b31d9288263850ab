"""Backbones and the continual model wrapper.

``build_model(name, input_shape, n_classes, task_classes=...)`` returns a :class:`ContinualNet`
(backbone + single or multi head, logits always over the global label space). Backbones are
registered by name in :data:`BACKBONES`; :func:`backbone_names` lists them with a description.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from sparsecl import SparseCLError
from sparsecl.models._common import Backbone
from sparsecl.models.heads import ContinualNet, MultiHead
from sparsecl.models.lenet import LeNet
from sparsecl.models.mlp import MLP
from sparsecl.models.mobilenet import MobileNetV2
from sparsecl.models.resnet import ResNet18
from sparsecl.models.vgg import VGG16BN, VGGLike
from sparsecl.registry import Registry

__all__ = [
    "BACKBONES", "Backbone", "ContinualNet", "MultiHead", "backbone_names", "build_backbone", "build_model",
    "LeNet", "MLP", "MobileNetV2", "ResNet18", "VGG16BN", "VGGLike",
]

#: name -> backbone class; each is called as ``cls(input_shape, **options)`` and has a ``description``.
BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")
BACKBONES.add("resnet18", ResNet18)
BACKBONES.add("mlp", MLP)
BACKBONES.add("lenet", LeNet)
BACKBONES.add("vgg16bn", VGG16BN)
BACKBONES.add("vgg-like", VGGLike)
BACKBONES.add("mobilenetv2", MobileNetV2)


def backbone_names() -> dict[str, str]:
    """Registered backbone names, each with a one-line description."""
    return {name: getattr(cls, "description", "") for name, cls in BACKBONES.items()}


def _options(cls: Callable[..., Any]) -> list[str]:
    params = list(inspect.signature(cls).parameters.values())[1:]  # skip input_shape
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_backbone(name: str, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
    """Instantiate backbone ``name`` for samples of shape ``input_shape`` (errors are one line)."""
    cls = BACKBONES.get(name)
    known = _options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SparseCLError(
            f"backbone {name!r} has no option {', '.join(map(repr, unknown))} "
            f"(options: {', '.join(known) or 'none'})"
        )
    for key, value in options.items():  # every numeric backbone option is a width or a size
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0 for v in numbers):
            raise SparseCLError(f"backbone {name!r}: option {key} must be positive, got {value!r}")
    try:
        return cls(tuple(int(s) for s in input_shape), **options)
    except (TypeError, ValueError) as e:  # e.g. nf="wide": report as a user error, not a traceback
        raise SparseCLError(f"bad options for backbone {name!r}: {e}") from None


def build_model(
    backbone: str,
    input_shape: tuple[int, int, int],
    n_classes: int,
    *,
    task_classes: list[list[int]] | None = None,
    **backbone_kwargs: Any,
) -> ContinualNet:
    """Backbone ``backbone`` plus a classifier head over ``n_classes`` global labels.

    Args:
        backbone: a registered name (see :func:`backbone_names`).
        input_shape: ``(C, H, W)`` of one sample.
        n_classes: size of the global label space.
        task_classes: ``None`` for one shared ``nn.Linear`` head (Class-IL); otherwise the classes of
            each task, giving a :class:`MultiHead` with one linear classifier per task.
        **backbone_kwargs: backbone options (e.g. ``nf=20`` for resnet18, ``hidden=[256, 256]`` for mlp).
    """
    if int(n_classes) < 1:
        raise SparseCLError(f"n_classes must be >= 1, got {n_classes}")
    net = build_backbone(backbone, input_shape, **backbone_kwargs)
    if task_classes is None:
        head: nn.Module = nn.Linear(net.feature_dim, int(n_classes))
    else:
        head = MultiHead(net.feature_dim, int(n_classes), task_classes)
    return ContinualNet(
        net, head, int(n_classes),
        task_classes=None if task_classes is None else [list(map(int, t)) for t in task_classes],
        backbone_name=backbone, input_shape=tuple(input_shape),
    )
