"""BatchNorm + ReLU (+ a residual) between frames: the dense rest of a batch-last ResNet step in one
pass each way.

:func:`batch_norm_relu` computes ``relu(batch_norm(y) + residual)`` from a convolution's output
frame and writes it straight into the zero-padded input frame of the next convolution (the
C++ kernels of ``csrc/batch_norm_relu.cpp``); its backward writes BatchNorm's input gradient into
the producing convolution's output-gradient frame and the residual's gradient into the residual's
frame. Against ``F.batch_norm`` + ``F.relu`` + a padded copy, this saves the normalised tensor, the
ReLU's pass, the copies into padded buffers and their zero fills. Results equal
``F.batch_norm`` (batch or running statistics, running-statistics update, affine or not) followed
by the ReLU, to float32 rounding.
"""
from __future__ import annotations

import torch

from sparsecl import SparseCLError
from sparsecl.sparse.kernels.build import load_extension
from sparsecl.sparse.kernels.index import Frame


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, yp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rp: torch.Tensor | None,
                frame: Frame, rframe: Frame | None, running: tuple[torch.Tensor, torch.Tensor] | None,
                batch_stats: bool, momentum: float, eps: float, out_frame: Frame) -> torch.Tensor:
        C, f = yp.shape[0], frame
        out = yp.new_empty(out_frame.buffer_shape(C))
        mean, var = (yp.new_empty(C), yp.new_empty(C)) if batch_stats else (running[0].clone(), running[1].clone())
        invstd = yp.new_empty(C)
        empty = yp.new_empty(0)
        r, (rtop, rleft) = (rp, (rframe.top, rframe.left)) if rp is not None else (empty, (0, 0))
        load_extension().bn_relu_forward(yp, f.top, f.left, f.H, f.W, f.N, r, rtop, rleft, weight, bias, mean, var,
                                         invstd, batch_stats, eps, out, out_frame.top, out_frame.left)
        if batch_stats and running is not None:   # nn.BatchNorm's update, with the unbiased variance
            count = f.H * f.W * f.N
            running[0].mul_(1 - momentum).add_(mean, alpha=momentum)
            running[1].mul_(1 - momentum).add_(var * (count / (count - 1)), alpha=momentum)
        ctx.frames, ctx.batch_stats = (frame, rframe, out_frame), batch_stats
        ctx.save_for_backward(yp, out, mean, invstd, weight)
        return out

    @staticmethod
    def backward(ctx, gout: torch.Tensor):
        yp, out, mean, invstd, weight = ctx.saved_tensors
        frame, rframe, out_frame = ctx.frames
        f = frame
        gy = yp.new_empty(yp.shape)
        gr = yp.new_empty(rframe.buffer_shape(yp.shape[0])) if ctx.needs_input_grad[3] else yp.new_empty(0)
        rtop, rleft = (rframe.top, rframe.left) if rframe is not None else (0, 0)
        dgamma, dbeta = yp.new_empty(yp.shape[0]), yp.new_empty(yp.shape[0])
        load_extension().bn_relu_backward(gout.contiguous(), out, out_frame.top, out_frame.left, yp, f.top, f.left,
                                          f.H, f.W, f.N, mean, invstd, weight, ctx.batch_stats, gy, gr, rtop, rleft,
                                          dgamma, dbeta)
        return (gy, dgamma if ctx.needs_input_grad[1] else None, dbeta if ctx.needs_input_grad[2] else None,
                gr if ctx.needs_input_grad[3] else None, None, None, None, None, None, None, None)


def batch_norm_relu(yp: torch.Tensor, frame: Frame, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, batch_stats: bool,
                    momentum: float, eps: float, padding: tuple[int, int],
                    residual: tuple[torch.Tensor, Frame] | None = None) -> tuple[torch.Tensor, Frame]:
    """``relu(F.batch_norm(y, ...) + residual)`` of frames, written into a new frame with a border of ``padding``.

    Args:
        yp, frame: the input (e.g. a convolution's output buffer and its frame).
        weight, bias, running_mean, running_var, batch_stats, momentum, eps: as ``F.batch_norm``'s
            ``weight, bias, running_mean, running_var, training, momentum, eps`` (``batch_stats``:
            normalise with the batch's statistics and update the running ones, when given).
        padding: the border (rows, columns) of the output frame, the next convolution's padding.
        residual: ``(buffer, frame)`` of a tensor added before the ReLU (a shortcut), same values' shape.

    Returns:
        ``(out, out_frame)``; differentiable in ``yp``, ``weight``, ``bias`` and the residual. The
        gradient ``out`` receives is read at the frame's values only.
    """
    C = yp.shape[0]
    if residual is not None and (residual[1].H, residual[1].W, residual[1].N) != (frame.H, frame.W, frame.N):
        raise SparseCLError("batch_norm_relu: the residual's shape differs from the input's")
    if batch_stats and frame.H * frame.W * frame.N < 2:
        raise SparseCLError("batch_norm_relu: batch statistics need more than 1 value per channel")
    if not batch_stats and (running_mean is None or running_var is None):
        raise SparseCLError("batch_norm_relu: running statistics are needed without batch statistics")
    w = weight if weight is not None else yp.new_ones(C)
    b = bias if bias is not None else yp.new_zeros(C)
    running = (running_mean, running_var) if running_mean is not None and running_var is not None else None
    rp, rframe = residual if residual is not None else (None, None)
    out_frame = frame.padded(padding)
    out = _BatchNormReLU.apply(yp.contiguous(), w, b, rp if rp is None else rp.contiguous(), frame, rframe,
                               running, batch_stats, momentum, eps, out_frame)
    return out, out_frame
