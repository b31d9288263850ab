"""VGG16 backbones for 32x32 images: ``vgg16bn`` (CL-LSG) and ``vgg-like`` (continual DST).

Both use the 13 3x3 convolutions of VGG16 (configuration D: 64,64,M,128,128,M,256x3,M,512x3,M,
512x3,M), each followed by BatchNorm and ReLU, with conv biases as in torchvision's ``vgg16_bn``.
After the five max-pools a 32x32 input is 512x1x1; a global average pool makes the feature
vector 512 wide for any input size (for 32x32 it is the identity, i.e. the usual flatten).

``vgg16bn``: the common CIFAR VGG16-BN whose only fully connected layer is the classifier.

``vgg-like``: the continual-DST study names "VGG-like" and cites Simonyan & Zisserman only; its
code builds on the ITOP / sparse_learning library, whose ``VGG16('like')`` (from the SNIP paper)
is the same conv stack followed by Linear(512, 512) -> ReLU -> BatchNorm1d(512) (BatchNorm in
place of dropout) before the classifier. That is what we build: features are the 512 outputs of
that BatchNorm1d.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsecl.models._common import Backbone, check_image_shape

VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg_convs(in_channels: int, cfg: list[int | str] = VGG16_CFG) -> nn.Sequential:
    """Conv(3x3, pad 1)+BN+ReLU for each width in ``cfg``, 2x2 max-pool for each ``'M'``."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers)


class VGG16BN(Backbone):
    """VGG16 with BatchNorm for CIFAR-sized inputs (``feature_dim = 512``).

    Args:
        input_shape: ``(C, H, W)`` with H, W >= 32 (five 2x2 max-pools).
    """

    description = "VGG16-BN for 32x32 inputs (13 conv+BN+ReLU, 5 max-pools, global pool -> 512)"

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, _, _ = check_image_shape("vgg16bn", input_shape, min_size=32)
        self.features = vgg_convs(c)
        self.feature_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class VGGLike(Backbone):
    """The SNIP/ITOP "VGG-like" network minus its classifier (``feature_dim = hidden``).

    Args:
        input_shape: ``(C, H, W)`` with H, W >= 32.
        hidden: width of the fully connected layer before the classifier (512 in the reference).
    """

    description = "VGG-like (SNIP/ITOP): VGG16-BN convs + Linear 512 -> ReLU -> BatchNorm1d (continual DST)"

    def __init__(self, input_shape: tuple[int, int, int], hidden: int = 512) -> None:
        super().__init__()
        c, _, _ = check_image_shape("vgg-like", input_shape, min_size=32)
        self.features = vgg_convs(c)
        hidden = int(hidden)
        self.fc = nn.Sequential(nn.Linear(512, hidden), nn.ReLU(inplace=True), nn.BatchNorm1d(hidden))
        self.feature_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))
