"""Batched augmentation on the training device: random crop with zero padding, horizontal flip,
normalisation; uint8 ``[B, C, H, W]`` in, float32 out.

Equivalent per sample to torchvision's ``RandomCrop(H, padding=p)`` (zero fill) ->
``RandomHorizontalFlip()`` -> ``ToTensor()`` -> ``Normalize(mean, std)``, but done for the
whole batch with precomputed index tables and one ``gather``: no per-sample Python loop, no
host synchronisation (no ``.item()``, boolean-mask indexing or ``nonzero``), so a training
step that uses it can be captured in a CUDA graph. Randomness comes from the global torch RNG
of the tensor's device, hence ``torch.manual_seed`` makes it reproducible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsecl import SparseCLError
from sparsecl.data.stream import AugmentSpec


class DeviceAugment:
    """Augmentation and normalisation for one benchmark (built from its :class:`AugmentSpec`)."""

    def __init__(self, spec: AugmentSpec, input_shape: tuple[int, int, int], *,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        """``memory_format``: layout of the float outputs (e.g. ``torch.channels_last`` for
        convolutions that prefer it); produced by the uint8->float conversion, at no extra cost."""
        channels = int(input_shape[0])
        mean, std = tuple(spec.mean), tuple(spec.std)
        # A single value applies to every channel (as Normalize broadcasts it).
        if len(mean) == 1:
            mean = mean * channels
        if len(std) == 1:
            std = std * channels
        if len(mean) != channels or len(std) != channels:
            raise SparseCLError(f"augmentation mean/std have {len(mean)}/{len(std)} values for {channels} channels")
        if any(s <= 0 for s in std):
            raise SparseCLError(f"augmentation std must be positive, got {std}")
        if spec.crop_padding < 0:
            raise SparseCLError(f"crop padding must be >= 0, got {spec.crop_padding}")
        self.spec = spec
        self.input_shape = tuple(int(d) for d in input_shape)
        self.padding = int(spec.crop_padding)
        self.hflip = bool(spec.hflip)
        # Layout of the float output (channels_last feeds NHWC conv kernels without a copy).
        self.memory_format = memory_format
        # (x/255 - mean)/std == x*scale + shift: one fused multiply-add per element.
        self._scale = [1.0 / (255.0 * s) for s in std]
        self._shift = [-m / s for m, s in zip(mean, std)]
        self._consts: dict[tuple[torch.device, int, int], tuple[torch.Tensor, ...]] = {}

    def _constants(self, device: torch.device, h: int, w: int) -> tuple[torch.Tensor, ...]:
        # Built once per device and size so that calls make no host->device copies (graph-safe).
        key = (device, h, w)
        if key not in self._consts:
            c, p = len(self._scale), self.padding
            n, wp = 2 * p + 1, w + 2 * p
            i = torch.arange(h).view(h, 1)
            j = torch.arange(w).view(1, w)
            # Flat index into the zero-padded [H+2p, W+2p] image of output pixel (i, j) for a crop at
            # offset (0, 0): base[0] unflipped, base[1] flipped (torchvision crops, then flips).
            base = torch.stack([(i * wp + j).view(-1), (i * wp + (w - 1 - j)).view(-1)])
            # Flat offset of each of the n*n crop positions (oy, ox) = divmod(k, n).
            k = torch.arange(n * n)
            offsets = (k // n) * wp + (k % n)
            self._consts[key] = (
                torch.tensor(self._scale, dtype=torch.float32).view(1, c, 1, 1).to(device),
                torch.tensor(self._shift, dtype=torch.float32).view(1, c, 1, 1).to(device),
                base.to(device),
                offsets.to(device),
            )
        return self._consts[key]

    def prepare(self, device: torch.device | str) -> "DeviceAugment":
        """Build the device constants for ``input_shape`` now (e.g. before CUDA-graph capture,
        during which their host->device copies would not be allowed); returns ``self``."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # tensors report "cuda:N", the key must match
            device = torch.device("cuda", torch.cuda.current_device())
        self._constants(device, self.input_shape[1], self.input_shape[2])
        return self

    def _check(self, x: torch.Tensor) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise TypeError(f"DeviceAugment expects uint8 [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] != len(self._scale):
            raise TypeError(f"DeviceAugment built for {len(self._scale)} channels, got {x.shape[1]}")

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """Normalisation only: uint8 ``[B, C, H, W]`` -> float32 on the same device."""
        self._check(x)
        scale, shift = self._constants(x.device, x.shape[2], x.shape[3])[:2]
        return torch.addcmul(shift, x.to(torch.float32, memory_format=self.memory_format), scale)

    def train(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop (zero padding ``p``, offsets uniform in ``[0, 2p]``), random horizontal flip
        (probability ½), then normalisation; uint8 ``[B, C, H, W]`` -> float32."""
        self._check(x)
        if self.padding == 0 and not self.hflip:
            return self.eval(x)
        b, c, h, w = x.shape
        scale, shift, base, offsets = self._constants(x.device, h, w)
        p = self.padding
        # One random index per sample picks the crop position uniformly among the (2p+1)^2 offsets
        # (oy, ox independent and uniform on [0, 2p]); another picks the flip. Table lookups turn
        # them into a flat source index per output pixel, so the crop+flip is a single gather
        # from the padded image: few kernels, fixed shapes, nothing read back to the host.
        if self.hflip:
            idx = base[torch.randint(0, 2, (b,), device=x.device)]
        else:
            idx = base[0].expand(b, h * w)
        if p > 0:
            idx = idx + offsets[torch.randint(0, offsets.numel(), (b,), device=x.device)].view(b, 1)
            x = F.pad(x, (p, p, p, p))  # zero fill in pixel space, before normalisation (as torchvision)
        out = x.reshape(b, c, -1).gather(2, idx.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)
        return torch.addcmul(shift, out.to(torch.float32, memory_format=self.memory_format), scale)


__all__ = ["DeviceAugment"]
