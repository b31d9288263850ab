"""Small helpers shared by the backbones (not public API)."""
from __future__ import annotations

import torch
from torch import nn

from sparsecl import SparseCLError


class Backbone(nn.Module):
    """Base class of the feature extractors: ``forward(x) -> [B, feature_dim]``.

    Subclasses set ``feature_dim`` in ``__init__`` and a one-line ``description`` on the class.
    """

    description: str = ""
    feature_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial output size of a convolution or pooling window (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def check_image_shape(name: str, input_shape: tuple[int, ...], min_size: int = 1) -> tuple[int, int, int]:
    """Validate a ``(C, H, W)`` input shape for an image backbone."""
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise SparseCLError(f"backbone {name!r} needs an input shape (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    if h < min_size or w < min_size:
        raise SparseCLError(f"backbone {name!r} needs images of at least {min_size}x{min_size}, got {h}x{w}")
    return c, h, w
