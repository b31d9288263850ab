"""One seed fixes everything: python, numpy and torch RNGs (CPU and every CUDA device).

RNG states are captured after each task and restored on resume so that a resumed run draws the
same augmentations, batch orders, buffer samples and mask regrowths as an uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """All RNG states as plain tensors/lists (loadable with ``torch.load(weights_only=True)``).

    With a CUDA ``device`` its generator is also saved on its own, for :func:`set_rng_state` to
    restore on whichever device the loading process trains on (a torchrun rank's ``cuda:LOCAL_RANK``).
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`; the saved training-device generator goes to ``device`` (CUDA)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
