"""MobileNetV2 (Sandler et al., 2018) adapted to 32x32 images.

Inverted residual blocks as in the paper: 1x1 expansion (factor t) + BN + ReLU6, 3x3 depthwise
+ BN + ReLU6, 1x1 linear projection + BN; an identity shortcut only when the stride is 1 and
the widths match (no 1x1 conv shortcuts). The stage table (t, c, n, s) is the paper's:
(1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), 32-wide stem,
1280-wide final 1x1 conv, global average pool.

For CIFAR (``small_input=True``, default) the stem conv and the first stride-2 stage (24
channels) use stride 1, as in the common CIFAR ports, so the total stride is 8 (32x32 -> 4x4)
instead of 32. ``small_input=False`` gives the ImageNet strides.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsecl.models._common import Backbone, check_image_shape

# (expansion t, output channels c, repeats n, stride s of the first block)
STAGES: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a width to a multiple of ``divisor`` without dropping more than 10% (reference rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) + BN (+ ReLU6)."""
    mods: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        mods.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*mods)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand (1x1) -> depthwise (3x3) -> linear project (1x1)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1))
        layers += [conv_bn(hidden, hidden, 3, stride=stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(Backbone):
    """MobileNetV2 feature extractor (``feature_dim = 1280`` for width_mult <= 1).

    Args:
        input_shape: ``(C, H, W)``; any size >= 8.
        width_mult: width multiplier applied to every layer (widths rounded to multiples of 8;
            the last layer is never narrowed below 1280, as in the paper).
        small_input: CIFAR strides (stride-1 stem and 24-channel stage) instead of ImageNet's.
    """

    description = "MobileNetV2 for 32x32 inputs (stride-1 stem and 2nd stage; width_mult option)"

    def __init__(self, input_shape: tuple[int, int, int], width_mult: float = 1.0, small_input: bool = True) -> None:
        super().__init__()
        c, _, _ = check_image_shape("mobilenetv2", input_shape, min_size=8)
        width_mult = float(width_mult)
        cin = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn(c, cin, 3, stride=1 if small_input else 2)]
        for i, (t, ch, n, s) in enumerate(STAGES):
            if small_input and i == 1:
                s = 1  # keep 32x32 resolution longer on small images
            cout = make_divisible(ch * width_mult)
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
        layers.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.feature_dim = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))
