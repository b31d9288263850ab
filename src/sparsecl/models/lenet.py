"""The "modified LeNet-5 with 20-50-800-500 neurons" used on 10-split CIFAR-100 (CL-LSG, APD, RCL).

CL-LSG gives only the widths. The four numbers are the four weight layers' widths: two 5x5
convolutions with 20 and 50 filters, then fully connected layers of 800 and 500 units. The rest
follows the public PyTorch ports of this network used in continual learning (GPM/TRGP lineage,
itself from the TensorFlow CIFAR-10 tutorial model): 'same' padding (2), ReLU, local response
normalisation (size 4, alpha 0.001/9, beta 0.75, k 1), 3x3 max-pool stride 2 padding 1. So a
32x32 input gives 50x8x8 = 3200 features to the 800-unit layer. ``lrn=False`` drops the LRN.
(In the Caffe LeNet-5 for 28x28 MNIST, "800" is instead the flattened 50x4x4 map; that network
has no 800-unit layer and does not fit CIFAR without changes, so it is not what we build.)
"""
from __future__ import annotations

import torch
from torch import nn

from sparsecl.models._common import Backbone, check_image_shape, conv_out


class LeNet(Backbone):
    """LeNet-5 variant 20-50-800-500 (``feature_dim = 500`` by default).

    Args:
        input_shape: ``(C, H, W)``; any channel count and size >= 4.
        channels: the two conv widths and two fully connected widths.
        lrn: local response normalisation after each conv block (as the reference ports).
        bias: biases on the conv/linear layers (the classic LeNet has them).
    """

    description = "LeNet-5 variant 20-50-800-500 (5x5 convs, 3x3/2 max-pool, LRN; CL-LSG 10-split CIFAR-100)"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        channels: tuple[int, int, int, int] = (20, 50, 800, 500),
        lrn: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        c, h, w = check_image_shape("lenet", input_shape, min_size=4)
        c1, c2, f1, f2 = (int(v) for v in channels)

        def block(cin: int, cout: int) -> list[nn.Module]:
            mods: list[nn.Module] = [nn.Conv2d(cin, cout, 5, padding=2, bias=bias), nn.ReLU()]
            if lrn:
                mods.append(nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0))
            mods.append(nn.MaxPool2d(3, stride=2, padding=1))
            return mods

        self.features = nn.Sequential(*block(c, c1), *block(c1, c2), nn.Flatten())
        for _ in range(2):  # conv keeps the size ('same'); each pool halves it (rounding up)
            h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
        self.fc = nn.Sequential(
            nn.Linear(c2 * h * w, f1, bias=bias), nn.ReLU(),
            nn.Linear(f1, f2, bias=bias), nn.ReLU(),
        )
        self.feature_dim = f2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
