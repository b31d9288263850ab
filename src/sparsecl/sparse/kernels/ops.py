"""Autograd functions of the sparse kernels: :func:`sparse_conv2d` and :func:`sparse_linear`.

Forward, input gradient and weight gradient run in the C++ kernels on batch-last tensors; the weight
gradient is computed only at the index's weight-gradient positions (the mask unless
:meth:`SparseConvIndex.set_weight_grad` says otherwise) and is zero elsewhere.
"""
from __future__ import annotations

import torch

from sparsecl import SparseCLError
from sparsecl.sparse.kernels.build import load_extension
from sparsecl.sparse.kernels.index import LANES, Frame, Geometry, RowGeometry, SparseConvIndex


def into_frame(x: torch.Tensor, frame: Frame) -> torch.Tensor:
    """``x [C, H, W, N]`` placed in a new zero-bordered buffer of ``frame`` (``x`` itself, made
    contiguous, when the frame has no border). Differentiable in ``x``."""
    C, H, W, N = x.shape
    if (frame.top, frame.left, frame.Hb, frame.Wb, frame.Nb) == (0, 0, H, W, N):
        return x.contiguous()
    out = x.new_empty(frame.buffer_shape(C))
    load_extension().zero_frame_border(out, frame.top, frame.left, H, W, N)   # the border only
    frame.values(out).copy_(x)
    return out


class _FrameValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf: torch.Tensor, frame: Frame, stride: tuple[int, int]) -> torch.Tensor:
        ctx.frame, ctx.stride, ctx.shape = frame, stride, buf.shape
        (sh, sw), f = stride, frame
        return buf[:, f.top:f.top + f.H:sh, f.left:f.left + f.W:sw, :f.N].contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (sh, sw), f = ctx.stride, ctx.frame
        out = g.new_zeros(ctx.shape)
        out[:, f.top:f.top + f.H:sh, f.left:f.left + f.W:sw, :f.N] = g
        return out, None, None


def frame_values(buf: torch.Tensor, frame: Frame, stride: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """The frame's values at every ``stride``-th row and column, as a contiguous ``[C, H', W', N]``
    (a strided 1x1 shortcut's input). One autograd node, where slicing would be one per dimension,
    each zero-filling and copying a whole buffer in the backward."""
    return _FrameValues.apply(buf, frame, tuple(stride))


def _unpad_batch(y: torch.Tensor, N: int) -> torch.Tensor:
    return y if y.shape[-1] == N else y[..., :N].contiguous()


def _gather(ext, src: torch.Tensor, val: torch.Tensor, tables, Np: int, out_shape: tuple[int, ...]) -> torch.Tensor:
    out = src.new_empty(out_shape)
    ln = tables.lines
    ext.gather(src, val, tables.noff, tables.blkptr, tables.nblk, tables.rowcls, tables.rowbase, ln.pin, ln.pout,
               ln.len, ln.clsptr, Np, ln.step, ln.ostep, tables.sblines, out)
    return out


def _phase_rows(x: torch.Tensor, index: SparseConvIndex, rg: RowGeometry) -> torch.Tensor:
    """``x [C, H, W, N]`` zero-padded and split into stride phases along W: ``[C, Hp, sw, Wq]``."""
    C, H, W, N = x.shape
    sw, (ph, pw) = index.stride[1], index.padding
    out = x.new_zeros(C, rg.Hp, sw, rg.Wq)
    for f in range(sw):   # one strided copy per phase (the stride along W), not per element
        c0 = max(0, -(-(pw - f) // sw))          # first phase column that holds an image column
        cols = x[:, :, c0 * sw + f - pw::sw]
        n = cols.shape[2]
        out[:, ph:ph + H, f, c0 * N:(c0 + n) * N] = cols.reshape(C, H, n * N)
    return out


def _row_forward(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """Inference forward for batches below the vector width (vectors along the output row)."""
    C, H, W, N = x.shape
    rg = index.row_geometry(H, W, N)
    val = weight.detach().reshape(-1)[index.taps.flat].contiguous()
    y = _gather(load_extension(), _phase_rows(x, index, rg), val, rg.fwd, LANES, (index.OC, rg.OH, rg.row))
    y = y[..., :rg.OW * N].reshape(index.OC, rg.OH, rg.OW, N)
    return y if bias is None else y + bias.detach().view(-1, 1, 1, 1)


def _weight_grad(ctx, xp: torch.Tensor, gy: torch.Tensor, framed: bool) -> torch.Tensor:
    """The weight gradient at the index's weight-gradient positions (dense-shaped, zero elsewhere) from
    the padded input and the output gradient (plain ``[OC, OH, OW, Np]``, or in the output's frame)."""
    index: SparseConvIndex = ctx.index
    g: Geometry = ctx.geom
    taps, tables = index.wgrad_tables(g, framed)
    dw = gy.new_empty(taps.flat.numel())
    ln = tables.lines
    load_extension().wgrad(xp, gy, tables.noff, tables.blkptr, tables.nblk, ln.pin, ln.pout, ln.len, g.Np, ln.step,
                           tables.sblines, dw)
    return dw.new_zeros(ctx.weight_shape.numel()).index_put_((taps.flat,), dw).view(ctx.weight_shape)


def _input_grad(ctx, gyp: torch.Tensor, tables, out_shape: tuple[int, ...]) -> torch.Tensor:
    """The input-gradient gather of the padded output gradient ``gyp`` (the output gradient's frame)."""
    val = ctx.saved_tensors[1]
    return _gather(load_extension(), gyp, val[ctx.index._bwd_order].contiguous(), tables, ctx.geom.Np, out_shape)


class _SparseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                index: SparseConvIndex) -> torch.Tensor:
        C, H, W, N = x.shape
        g = index.geometry(H, W, N)
        xp = into_frame(x.detach(), g.in_frame)
        val = weight.detach().reshape(-1)[index.taps.flat].contiguous()
        y = _unpad_batch(_gather(load_extension(), xp, val, g.fwd, g.Np, (index.OC, g.OH, g.OW, g.Np)), N)
        if bias is not None:
            y.add_(bias.detach().view(-1, 1, 1, 1))
        ctx.index, ctx.geom, ctx.has_bias, ctx.weight_shape = index, g, bias is not None, weight.shape
        ctx.save_for_backward(xp, val)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        g: Geometry = ctx.geom
        gy = gy.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gyp = into_frame(gy, g.out_frame)
            gx = _unpad_batch(_input_grad(ctx, gyp, g.bwd, (ctx.index.C, g.H, g.W, g.Np)), g.N)
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(ctx, ctx.saved_tensors[0], into_frame(gy, Frame.plain(gy).padded((0, 0))), False)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(dim=(1, 2, 3))
        return gx, gw, gb, None


class _FramedConv(torch.autograd.Function):
    """A bias-free convolution from the input's frame to the output's (see :func:`framed_sparse_conv2d`)."""

    @staticmethod
    def forward(ctx, xp: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex, g: Geometry) -> torch.Tensor:
        val = weight.detach().reshape(-1)[index.taps.flat].contiguous()
        ext, f = load_extension(), g.out_frame
        y = _gather(ext, xp, val, g.framed_fwd, g.Np, f.buffer_shape(index.OC))
        ext.zero_frame_border(y, f.top, f.left, f.H, f.W, f.N)
        ctx.index, ctx.geom, ctx.weight_shape = index, g, weight.shape
        ctx.save_for_backward(xp, val)
        return y

    @staticmethod
    def backward(ctx, gyp: torch.Tensor):
        g: Geometry = ctx.geom
        gyp = gyp.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            f = g.in_frame
            gx = _input_grad(ctx, gyp, g.framed_bwd, f.buffer_shape(ctx.index.C))
            load_extension().zero_frame_border(gx, f.top, f.left, f.H, f.W, f.N)
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(ctx, ctx.saved_tensors[0], gyp, True)
        return gx, gw, None, None


def _check(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex, dims: int, channels: int) -> None:
    if x.dim() != dims or x.dtype != torch.float32 or x.device.type != "cpu":
        raise SparseCLError(f"sparse kernels: expected a float32 CPU input of {dims} dims (batch last), got {x.dim()} dims {x.dtype} on {x.device}")
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise SparseCLError(f"sparse kernels: expected a float32 CPU weight, got {weight.dtype} on {weight.device}")
    if tuple(weight.shape) != index.weight_shape:
        raise SparseCLError(f"sparse kernels: weight shape {tuple(weight.shape)} does not match the index's {index.weight_shape}")
    if x.shape[0] != channels:
        raise SparseCLError(f"sparse kernels: input has {x.shape[0]} channels, the weight expects {channels}")


def _row_inference(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex, bias: torch.Tensor | None) -> bool:
    """Check a conv call's arguments; True for an untracked batch below the vector width (the row kernels)."""
    if index.linear:
        raise SparseCLError("sparse kernels: this index was built for a linear weight; use sparse_linear")
    _check(x, weight, index, 4, index.C)
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return x.shape[3] < LANES and not tracked


def sparse_conv2d(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse 2-d convolution of a batch-last input.

    Args:
        x: ``[C, H, W, N]`` float32 (batch last).
        weight: the dense parameter ``[OC, C/groups, kh, kw]``; only the index's positions are read
            (weights outside the mask count as zero).
        index: the mask's :class:`SparseConvIndex` (stride, padding, groups).
        bias: optional ``[OC]``.

    Returns:
        ``[OC, OH, OW, N]``; differentiable in ``x``, ``weight`` (at the weight-gradient positions only)
        and ``bias``. Without autograd (inference) a batch below 16 is vectorised along the output
        row instead of being padded to 16.
    """
    if _row_inference(x, weight, index, bias):
        return _row_forward(x, weight, index, bias)
    return _SparseConv.apply(x, weight, bias, index)


def framed_sparse_conv2d(xp: torch.Tensor, frame: Frame, weight: torch.Tensor,
                         index: SparseConvIndex) -> tuple[torch.Tensor, Frame]:
    """Bias-free sparse convolution between frames (see :class:`~sparsecl.sparse.kernels.index.Frame`).

    Args:
        xp: the input's zero-bordered buffer; ``frame`` says where its values are. When it is not the
            frame the convolution reads (its padding), the values are copied into one first.
        weight, index: as for :func:`sparse_conv2d`.

    Returns:
        ``(yp, out_frame)``: the output in the frame that the input gradient reads the output gradient
        in, so the op producing that gradient (:func:`~sparsecl.sparse.kernels.batchnorm.batch_norm_relu`)
        writes it there and nothing is padded in the backward; the gradient ``yp`` receives must
        have a zero border. Same gradients as :func:`sparse_conv2d`; the input gradient comes back
        in the input's frame.
    """
    if index.linear:
        raise SparseCLError("sparse kernels: this index was built for a linear weight; use sparse_linear")
    _check(xp, weight, index, 4, index.C)
    g = index.geometry(frame.H, frame.W, frame.N)
    if frame != g.in_frame:
        xp = into_frame(frame.values(xp), g.in_frame)
    return _FramedConv.apply(xp, weight, index, g), g.out_frame


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, index: SparseConvIndex,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse linear layer of a batch-last input: ``x [I, N]``, ``weight [O, I]`` -> ``[O, N]``.

    The same kernels as :func:`sparse_conv2d` (a 1x1 convolution of a 1x1 image), same gradients.
    """
    if not index.linear:
        raise SparseCLError("sparse kernels: this index was built for a conv weight; use sparse_conv2d")
    _check(x, weight, index, 2, index.C)
    y = _SparseConv.apply(x.reshape(x.shape[0], 1, 1, x.shape[1]), weight.view(index.mask.shape), bias, index)
    return y.view(index.OC, x.shape[1])
