"""Reduced ResNet-18 for small images (Mammoth / DER / SparCL variant).

Differences from the ImageNet ResNet-18: 3x3 stride-1 stem, no max-pool, so 32x32 inputs keep
32x32 feature maps in the first stage; widths ``nf, 2nf, 4nf, 8nf``. Pooling is global
(adaptive), so the same network accepts 64x64 (Tiny-ImageNet) and 84x84 (miniImageNet).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsecl.models._common import Backbone, check_image_shape


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or 1x1 conv+BN shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(Backbone):
    """Reduced ResNet-18 feature extractor (``feature_dim = 8 * nf``).

    Args:
        input_shape: ``(C, H, W)`` of one sample; any number of channels and any size >= 8.
        nf: width of the first stage (64 in the seq-cifar10 protocol; 20 is Mammoth's "reduced" net).
    """

    description = "reduced ResNet-18 (3x3 stride-1 stem, no max-pool, BasicBlocks [2,2,2,2], nf=64)"

    def __init__(self, input_shape: tuple[int, int, int], nf: int = 64) -> None:
        super().__init__()
        c, _, _ = check_image_shape("resnet18", input_shape, min_size=8)
        nf = int(nf)
        self.conv1 = conv3x3(c, nf)
        self.bn1 = nn.BatchNorm2d(nf)
        self.in_planes = nf
        self.layer1 = self._make_layer(nf, 2, stride=1)
        self.layer2 = self._make_layer(2 * nf, 2, stride=2)
        self.layer3 = self._make_layer(4 * nf, 2, stride=2)
        self.layer4 = self._make_layer(8 * nf, 2, stride=2)
        self.feature_dim = 8 * nf

    def _make_layer(self, planes: int, n_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Global average pool + flatten (mean over H, W works for any size and is graph-capturable).
        return out.mean(dim=(2, 3))
