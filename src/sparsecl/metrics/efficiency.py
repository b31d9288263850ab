"""Memory footprint (SparCL appendix B.2 formula) and measured peak memory (SPEC, Metrics).

Formula, in bytes (fp32, 4 bytes per number), for a training batch of ``B`` samples:

- activations: ``2 * B * sum_l out_numel_l * 4`` over the conv/linear layers ``l`` (the outputs
  kept for the backward pass, with the factor 2 of the reference formula),
- weights: ``(1 - s) * N * 4`` with ``N`` every parameter of the model and ``s`` its sparsity,
- gradients: ``(1 - (s + q)) * N * 4``, i.e. the gradient density times ``N * 4``,
- masks and the replay buffer: as given by the caller, shown separately, and all summed in ``total``.

Capacity (EsaCL eq. 6.24): ``(1 - S) + (1 - gamma) * T / 32`` with ``S`` the sparsity, ``T`` the
number of stored masks and ``gamma`` the mask compression rate (0.75 in EsaCL), see :func:`model_capacity`.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from torch import nn

from sparsecl.sparse.flops import LayerProfile

FLOAT_BYTES = 4
CAPACITY_GAMMA = 0.75  # EsaCL's mask compression rate (7-bit Huffman coding), section 6.1


def _measured_density(model: nn.Module) -> float:
    total = nnz = 0
    for p in model.parameters():
        total += p.numel()
        nnz += int(torch.count_nonzero(p.detach()))  # one sync per parameter; called once per task
    return nnz / total if total else 1.0


def memory_footprint(
    layers: list[LayerProfile],
    model: nn.Module,
    batch_size: int,
    *,
    weight_density: float | None = None,
    grad_density: float | None = None,
    mask_bytes: int = 0,
    buffer_bytes: int = 0,
) -> dict[str, int]:
    """Training memory by the SparCL formula, in bytes.

    Args:
        layers: per-layer profiles (:func:`sparsecl.sparse.flops.profile_layers`).
        model: the model whose parameters make ``N``.
        batch_size: samples per training step ``B`` (replay samples included).
        weight_density: ``1 - s`` over all parameters; ``None`` measures the nonzero fraction.
        grad_density: ``1 - (s + q)``; defaults to the weight density (no gradient mask).
        mask_bytes: bytes of stored masks; buffer_bytes: bytes of the replay buffer.

    Returns:
        ``{'activations', 'weights', 'gradients', 'masks', 'buffer', 'total'}`` in bytes.
    """
    n_params = sum(p.numel() for p in model.parameters())
    wd = _measured_density(model) if weight_density is None else float(weight_density)
    gd = wd if grad_density is None else float(grad_density)
    out = {
        "activations": 2 * int(batch_size) * sum(p.out_numel for p in layers) * FLOAT_BYTES,
        "weights": round(wd * n_params * FLOAT_BYTES),
        "gradients": round(gd * n_params * FLOAT_BYTES),
        "masks": int(mask_bytes),
        "buffer": int(buffer_bytes),
    }
    out["total"] = sum(out.values())
    return out


def model_capacity(sparsity: float, n_masks: int, gamma: float = CAPACITY_GAMMA) -> float:
    """EsaCL eq. 6.24: ``(1 - sparsity) + (1 - gamma) * n_masks / 32``.

    The first term is the fraction of nonzero weights, the second the stored masks (one bit per
    weight each, i.e. 1/32 of an fp32 weight, compressed by ``gamma``).
    """
    return (1.0 - float(sparsity)) + (1.0 - float(gamma)) * int(n_masks) / 32.0


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory since the last :func:`reset_peak_memory`: CUDA max allocated, else peak RSS.

    On CPU the peak resident set size of the process is read from ``/proc/self/status``
    (``VmHWM``, resettable) on Linux, else from ``resource.getrusage`` (KB on Linux, bytes on
    macOS; that one covers the whole process lifetime).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak measurement (CUDA peak stats; on Linux CPU, the process's RSS high-water mark)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets only VmHWM (Linux >= 4.0); harmless, and skipped where not permitted
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
