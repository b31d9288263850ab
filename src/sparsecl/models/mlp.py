"""Multi-layer perceptron (Mammoth's MNIST MLP: flatten -> 100 -> ReLU -> 100 -> ReLU)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.models._common import Backbone


class MLP(Backbone):
    """Fully connected feature extractor for inputs of any shape (flattened).

    Args:
        input_shape: shape of one sample, e.g. ``(1, 28, 28)`` or ``(1, 8, 8)``.
        hidden: widths of the hidden layers, each followed by a ReLU; ``feature_dim`` is the last.
    """

    description = "MLP: flatten -> 100 -> ReLU -> 100 -> ReLU (hidden sizes configurable)"

    def __init__(self, input_shape: tuple[int, ...], hidden: Sequence[int] = (100, 100)) -> None:
        super().__init__()
        in_features = math.prod(int(s) for s in input_shape)
        hidden = [int(h) for h in hidden]
        if in_features < 1 or not hidden or any(h < 1 for h in hidden):
            raise SparseCLError(f"mlp needs a non-empty input shape and positive hidden sizes, got {tuple(input_shape)} and {hidden}")
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.net = nn.Sequential(*layers)
        self.feature_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
